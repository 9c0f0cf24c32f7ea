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

No I/O here: the caller reads the tensors and writes the factors (api/extract.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SVD_CHOICES = ("auto", "exact", "randomized")
# torch.svd_lowrank's subspace: the rank plus this many extra directions, refined by NITER power iterations.
OVERSAMPLE = 16
NITER = 6
# auto takes the randomized SVD only for a rank this small against the matrix. Measured (docs/extract.md) on
# 1B-shaped changes: its relative error is within 0.35% of the exact SVD's for a flat (noise) spectrum and
# within 0.04% for a decaying one, at 5-20x less time.
RANDOMIZED_FROM = 1024   # smallest side of the matrix
RANDOMIZED_SHARE = 8     # rank + OVERSAMPLE at most 1/8 of the smallest side


@dataclass(frozen=True)
class Factors:
    """``up @ down`` approximates the change (the embedding's transposed change); ``rank`` is their shared side."""

    down: torch.Tensor             # lora_A (r, in) / lora_embedding_A (r, V)
    up: torch.Tensor               # lora_B (out, r) / lora_embedding_B (d, r)
    rank: int
    singular_values: torch.Tensor  # the ones computed, largest first (all of them for the exact SVD)
    method: str                    # "exact" or "randomized"


def choose_method(shape: tuple[int, int], max_rank: int, svd: str = "auto") -> str:
    """``exact`` (torch.linalg.svd) or ``randomized`` (torch.svd_lowrank) for a matrix of ``shape``."""
    if svd != "auto":
        return svd
    side = min(shape)
    small = min(max_rank, side) + OVERSAMPLE <= side // RANDOMIZED_SHARE
    return "randomized" if side >= RANDOMIZED_FROM and small else "exact"


def rank_for(singular_values: torch.Tensor, max_rank: int, sv_epsilon: float = 0.0) -> int:
    """mergekit's rule: min(max_rank, number of S), and with sv_epsilon > 0 at most the count of S > sv_epsilon.
    Singular values of exactly 0 are never kept (mergekit writes zero factors for an unchanged module)."""
    return min(max_rank, int((singular_values > sv_epsilon).sum().item()))


def decompose(delta: torch.Tensor, max_rank: int, *, sv_epsilon: float = 0.0, distribute_scale: bool = True,
              svd: str = "auto", seed: int = 0) -> Factors:
    """The LoRA factors of ``delta`` (2-D, float32 or float64; transpose an embedding's change first).

    The randomized SVD draws its test matrix from a generator seeded by ``seed`` (the global RNG is left
    as it was), so the same inputs give the same bytes.
    """
    method = choose_method(tuple(delta.shape), max_rank, svd)
    if method == "exact":
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        u, s, vh = _randomized(delta, min(max_rank + OVERSAMPLE, min(delta.shape)), seed)
    rank = rank_for(s, max_rank, sv_epsilon)
    s_kept = s[:rank]
    if distribute_scale:
        root = s_kept.sqrt()
        down, up = root[:, None] * vh[:rank], u[:, :rank] * root[None, :]
    else:
        down, up = s_kept[:, None] * vh[:rank], u[:, :rank]
    return Factors(down.contiguous(), up.contiguous(), rank, s, method)


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
