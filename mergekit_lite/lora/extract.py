"""LoRA extraction's arithmetic: the truncated SVD of one module's change ``FT - BASE`` as LoRA factors.

For a change ``delta`` (out, in) with SVD ``U diag(S) Vh``, the best rank-r approximation (Eckart-Young) is
``U[:, :r] diag(S[:r]) Vh[:r]``, stored as PEFT's ``lora_B`` (out, r) and ``lora_A`` (r, in) with scaling 1
(``lora_alpha == r``). mergekit-extract-lora 0.1.5's choices, kept so adapters compare one to one:

- rank = min(max_rank, min(out, in)), and with ``sv_epsilon > 0`` at most the number of singular values
  ``> sv_epsilon`` (an absolute threshold on S: mergekit compares ``s > sv_epsilon`` as is);
- ``distribute_scale``: sqrt(S) goes into both factors (A = sqrt(S) Vh, B = U sqrt(S)); without it
  A = S Vh and B = U;
- an embedding's change (V, d) is decomposed transposed, (d, V), giving PEFT's ``lora_embedding_A`` (r, V)
  and ``lora_embedding_B`` (d, r); PEFT adds ``(B @ A).T``.

How the top singular vectors are found (``--svd``): ``exact`` is torch.linalg.svd, as mergekit. ``gram``
eigendecomposes the smaller Gram matrix (``delta.T @ delta`` or ``delta @ delta.T``, formed in float32,
decomposed in float64) and projects ``delta`` on its top eigenvectors, whose norms are the singular values:
the exact SVD's error within 1e-6, 2-5x faster on large matrices, as long as the dropped directions hold at
least GRAM_RESIDUAL of the change (else it runs the exact SVD). ``auto`` is gram from GRAM_FROM up, else exact.
``randomized`` (torch.svd_lowrank) is only taken on request: fastest, but up to 0.3% worse on a flat spectrum.
Singular values below noise_floor are rounding noise and never kept (an exactly rank-3 change gets rank 3).

No files are opened here: ``extract_module`` reads through the checkpoints it is given, and the caller writes
the factors (api/extract.py; validation/adapter_recompute.py computes the same bits again with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SVD_CHOICES = ("auto", "exact", "gram", "randomized")
# torch.svd_lowrank's subspace: the rank plus this many extra directions, refined by NITER power iterations.
OVERSAMPLE = 16
NITER = 6
# auto: the Gram method from this smaller side up (below it torch.linalg.svd is about as fast), else exact.
GRAM_FROM = 512
# The Gram method squares the spectrum, so the dropped directions' share is resolved only to ~1e-7 of the
# largest eigenvalue: it is used only when its eigenvalues predict a relative residual at least this large
# (measured: exact-quality to 1e-6 there; at a residual of 1e-3 it is up to 4e-4 worse), else exact.
GRAM_RESIDUAL = 0.01


@dataclass(frozen=True)
class Factors:
    """``up @ down`` approximates the change (the embedding's transposed change); ``rank`` is their shared side."""

    down: torch.Tensor             # lora_A (r, in) / lora_embedding_A (r, V)
    up: torch.Tensor               # lora_B (out, r) / lora_embedding_B (d, r)
    rank: int
    singular_values: torch.Tensor  # largest first: all of them (exact, gram), rank + 16 of them (randomized)
    method: str                    # "exact", "gram" or "randomized": the one that ran


def choose_method(shape: tuple[int, int], max_rank: int, svd: str = "auto") -> str:
    """The method asked for: ``auto`` is ``gram`` when the smaller side is >= GRAM_FROM, else ``exact``
    (never ``randomized``). ``gram`` may still run the exact SVD (see decompose); ``max_rank`` is unused."""
    if svd != "auto":
        return svd
    return "gram" if min(shape) >= GRAM_FROM else "exact"


def rank_for(singular_values: torch.Tensor, max_rank: int, sv_epsilon: float = 0.0, floor: float = 0.0) -> int:
    """mergekit's rule: min(max_rank, number of S), and with sv_epsilon > 0 at most the count of S > sv_epsilon.
    Singular values of exactly 0, or at most ``floor`` (rounding noise, see noise_floor), are never kept."""
    return min(max_rank, int((singular_values > max(sv_epsilon, floor)).sum().item()))


def noise_floor(singular_values: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> float:
    """Below this a singular value is the change's rounding noise, not a direction: the largest one times
    sqrt(larger side) times the dtype's epsilon (a rank-3 float32 change has the others at ~5 epsilon)."""
    if singular_values.numel() == 0:
        return 0.0
    return float(singular_values.max()) * max(shape) ** 0.5 * torch.finfo(dtype).eps


def decompose(delta: torch.Tensor, max_rank: int, *, sv_epsilon: float = 0.0, distribute_scale: bool = True,
              svd: str = "auto", seed: int = 0) -> Factors:
    """The LoRA factors of ``delta`` (2-D, float32 or float64; transpose an embedding's change first).

    ``gram`` runs the exact SVD instead when its own eigenvalues predict a relative residual below
    GRAM_RESIDUAL (``Factors.method`` says which ran). The randomized SVD draws its test matrix from a
    generator seeded by ``seed`` (the global RNG is left as it was), so the same inputs give the same bytes.
    """
    method = choose_method(tuple(delta.shape), max_rank, svd)
    keep = min(max_rank, min(delta.shape))
    found = _gram(delta, keep) if method == "gram" else None
    if method == "gram" and found is None:
        method = "exact"
    if method == "exact":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    elif method == "randomized":
        u, s, vh = _randomized(delta, min(max_rank + OVERSAMPLE, min(delta.shape)), seed)
    else:
        u, s, vh = found
    floor = noise_floor(s[:keep], tuple(delta.shape), delta.dtype)
    rank = rank_for(s[:keep], max_rank, sv_epsilon, floor)   # the kept ones are the accurate ones (gram)
    s_kept = s[:rank]
    if distribute_scale:
        root = s_kept.sqrt()
        down, up = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    else:
        down, up = s_kept[:, None] * vh[:rank], u[:, :rank]
    return Factors(down.contiguous(), up.contiguous(), rank, s, method)


def extract_module(ft, base, name: str, embedding: bool, settings: dict, device: torch.device) -> Factors:
    """The factors of tensor ``name``'s change: FT - BASE read from the two checkpoints (``read(name)``), in
    float32 on ``device``, transposed for an embedding, decomposed with ``settings`` (max_rank, sv_epsilon,
    distribute_scale, svd) and the tensor's own seed."""
    delta = ft.read(name).to(device, torch.float32) - base.read(name).to(device, torch.float32)
    return decompose(delta.T if embedding else delta, settings["max_rank"], sv_epsilon=settings["sv_epsilon"],
                     distribute_scale=settings["distribute_scale"], svd=settings["svd"], seed=seed_of(name))


def _gram(delta: torch.Tensor, keep: int) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(U[:, :keep], S, Vh[:keep]) from the eigendecomposition (float64) of the smaller Gram matrix, or None
    when the predicted relative residual is below GRAM_RESIDUAL (the exact SVD is then more accurate).

    S[:keep] are the norms of delta's projections on the eigenvectors (accurate, sorted); the rest are
    sqrt(eigenvalues), accurate only to ~1e-4 of the largest (the Gram matrix's float32 rounding).
    """
    tall = delta.shape[0] >= delta.shape[1]
    gram = delta.T @ delta if tall else delta @ delta.T
    values, vectors = torch.linalg.eigh(gram.double())
    del gram
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)[:, :keep].to(delta.dtype)
    total = values.sum()
    if total == 0:   # no change: every singular value is 0
        zeros = values.to(delta.dtype)
        return torch.zeros_like(delta[:, :keep]), zeros, torch.zeros_like(delta[:keep])
    if float((values[keep:].sum() / total).sqrt()) < GRAM_RESIDUAL:
        return None
    scaled = delta @ vectors if tall else (vectors.T @ delta).T   # (side, keep): U S (tall) or V S
    norms = torch.linalg.vector_norm(scaled, dim=0)
    norms, order = norms.sort(descending=True)
    scaled, vectors = scaled[:, order], vectors[:, order]
    units = scaled / torch.where(norms > 0, norms, torch.ones_like(norms))
    s = torch.cat([norms, values[keep:].sqrt().to(delta.dtype).clamp(max=norms[-1])])   # stays sorted
    return (units, s, vectors.T) if tall else (vectors, s, units.T)


def _randomized(delta: torch.Tensor, q: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank with its random draws from ``seed``; returns (U, S, Vh) like torch.linalg.svd."""
    devices = [delta.device] if delta.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=NITER)
    return u, s, v.T


def relative_error(delta: torch.Tensor, factors: Factors) -> float:
    """||delta - up @ down||_F / ||delta||_F (0 for a zero change)."""
    norm = torch.linalg.matrix_norm(delta).item()
    if norm == 0:
        return 0.0
    return torch.linalg.matrix_norm(delta - factors.up @ factors.down).item() / norm


def optimal_error(singular_values: torch.Tensor, rank: int) -> float:
    """The smallest possible relative error at ``rank`` (Eckart-Young), from all singular values."""
    total = singular_values.square().sum()
    return float((singular_values[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0


def seed_of(name: str) -> int:
    """A stable seed from a tensor name (Python's hash() changes between runs)."""
    import zlib

    return zlib.crc32(name.encode())


def check_settings(max_rank: int, sv_epsilon: float, svd: str) -> Optional[str]:
    """What is wrong with the settings (a message naming the option), or None."""
    import math

    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        return f"--max-rank: {max_rank!r} is not a rank; give a whole number of 1 or more"
    if not math.isfinite(sv_epsilon) or sv_epsilon < 0:
        return f"--sv-epsilon: {sv_epsilon!r} is not a threshold; give 0 (keep max-rank) or a positive number"
    if svd not in SVD_CHOICES:
        return f"--svd: unknown method {svd!r}; use {', '.join(SVD_CHOICES)}"
    return None
