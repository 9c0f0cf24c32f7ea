"""The arithmetic of combining LoRA adapters into one adapter, as peft's ``LoraModel.add_weighted_adapter``.

Pure functions of tensors, one module at a time (peft 0.21.2, ``tuners/lora/model.py`` and
``utils/merge_utils.py``; shared/research/lora.md section 3). ``s_i`` is adapter i's scaling for the module,
``w_i`` the user's weight, ``dW_i = s_i * B_i @ A_i`` its delta:

- ``cat``: ``A = cat_rows(A_i * w_i * s_i)``, ``B = cat_cols(B_i)``, zero-padded to the new rank: exact.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the combination runs on the
  factors themselves, A with weights ``sign(w_i s_i) sqrt|w_i s_i|`` and B with ``sqrt|w_i s_i|``; the
  product has cross terms, so it only approximates ``sum w_i dW_i`` (exact for one adapter).
- ``svd`` and the ``*_svd`` variants: combine the full deltas ``dW_i`` (task arithmetic, TIES, DARE or
  magnitude pruning), then keep the top ``svd_rank`` singular triplets: ``B = U S``, ``A = Vh``.

The new adapter has ``lora_alpha = r`` (scaling 1): every source scaling is inside its factors.
Random pruning (DARE) draws its masks from the ``generator`` given, in peft's order inside a module: for the
factor methods all A factors (adapters in order), then all B factors; for the ``*_svd`` methods each delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .fold import delta_weight

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat", *FACTOR_METHODS, *SVD_METHODS)
DENSITY_METHODS = tuple(m for m in COMBINATIONS if m.startswith(("ties", "dare", "magnitude_prune")))
SIGN_METHODS = tuple(m for m in COMBINATIONS if "ties" in m)
RANDOM_METHODS = tuple(m for m in COMBINATIONS if m.startswith("dare"))
SAME_RANK_METHODS = FACTOR_METHODS   # peft: "All adapters must have the same r value"


@dataclass(frozen=True)
class Combination:
    """The parameters of ``add_weighted_adapter``, with its names."""

    combination_type: str
    weights: tuple[float, ...]
    density: Optional[float] = None
    svd_rank: Optional[int] = None
    svd_clamp: Optional[float] = None
    svd_full_matrices: bool = True
    svd_driver: Optional[str] = None
    majority_sign_method: str = "total"


@dataclass
class Factors:
    """One source adapter's factors of one module: A (r, in[, *k]) or (r, V), B (out, r[, 1...]) or (d, r)."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float
    weight: float


# --- peft's merge_utils, on a list of same-shape tensors ------------------------------------------------------

def magnitude_pruned(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest absolute value (peft's topk order), zero the rest."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    k = int(density * tensor.numel())
    mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def randomly_pruned(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by 1/density."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def combined(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: Optional[float],
             sign_method: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``method`` (linear/svd, ties, dare_linear, dare_ties, magnitude_prune) over same-shape ``tensors``."""
    family = method.removesuffix("_svd")
    if family in ("ties", "magnitude_prune"):
        tensors = [magnitude_pruned(t, density) for t in tensors]
    elif family in ("dare_linear", "dare_ties"):
        tensors = [randomly_pruned(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)                       # (n, *shape)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if family not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    # TIES: elect the sign per entry from the unweighted pruned tensors, then average the agreeing entries
    signs = stacked.sign()
    mass = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    agree = signs == torch.where(mass >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


# --- one module ---------------------------------------------------------------------------------------------

def combine_module(kind: str, sources: list[Factors], combo: Combination, new_rank: int,
                   generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's (A, B) of one module from the factors of the adapters that adapt it (in order).

    ``kind`` is ``linear``, ``embedding`` or ``conv`` (lora/fold.py); the result is float32."""
    method = combo.combination_type
    if method == "cat":
        return _cat(sources, new_rank)
    if method in FACTOR_METHODS:
        return _on_factors(method, sources, combo, generator)
    return _svd(kind, sources, combo, new_rank, generator)


def _cat(sources: list[Factors], new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    downs = torch.cat([s.down.float() * s.weight * s.scaling for s in sources], dim=0)   # (sum r_i, in)
    ups = torch.cat([s.up.float() for s in sources], dim=1)                              # (out, sum r_i)
    down = torch.zeros((new_rank, *downs.shape[1:]), dtype=torch.float32)
    up = torch.zeros((ups.shape[0], new_rank, *ups.shape[2:]), dtype=torch.float32)
    down[: downs.shape[0]] = downs
    up[:, : ups.shape[1]] = ups
    return down, up


def _on_factors(method: str, sources: list[Factors], combo: Combination,
                generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    # The sign of w*s goes on A only, so a negative weight subtracts instead of cancelling out in B @ A.
    products = [s.weight * s.scaling for s in sources]
    weights_down = torch.tensor([math.sqrt(abs(p)) * (1 if p >= 0 else -1) for p in products])
    weights_up = torch.tensor([math.sqrt(abs(p)) for p in products])
    down = combined(method, [s.down.float() for s in sources], weights_down, combo.density,
                    combo.majority_sign_method, generator)
    up = combined(method, [s.up.float() for s in sources], weights_up, combo.density,
                  combo.majority_sign_method, generator)
    return down, up


def _svd(kind: str, sources: list[Factors], combo: Combination, new_rank: int,
         generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    if combo.combination_type == "svd" and combo.svd_clamp is None:
        return _low_rank_svd(sources, new_rank)
    # Deltas in the base weight's layout (embedding: (V, d)), as peft's get_delta_weight returns them.
    deltas = [delta_weight(kind, s.down, s.up, s.scaling) for s in sources]
    weights = torch.tensor([s.weight for s in sources])
    method = "linear" if combo.combination_type == "svd" else combo.combination_type
    delta = combined(method, deltas, weights, combo.density, combo.majority_sign_method, generator)
    down_shape, up_shape = sources[0].down.shape, sources[0].up.shape
    if kind == "conv":
        delta = delta.squeeze() if tuple(delta.shape[2:4]) == (1, 1) else delta.flatten(start_dim=1)
    elif kind == "embedding":
        delta = delta.T                                          # (d, V): B @ A orientation
    u, s, vh = torch.linalg.svd(delta, full_matrices=combo.svd_full_matrices, driver=combo.svd_driver)
    up = u[:, :new_rank] @ torch.diag(s[:new_rank])              # (out, R)
    down = vh[:new_rank, :]                                      # (R, in)
    if combo.svd_clamp is not None:
        high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), combo.svd_clamp)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    if kind == "conv":
        up = up.reshape(up_shape[0], new_rank, *up_shape[2:])
        down = down.reshape(new_rank, *down_shape[1:])
    return down, up


def _low_rank_svd(sources: list[Factors], new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``svd`` without forming the full delta: sum w_i s_i B_i A_i = Bc @ Ac has rank <= sum r_i, so
    QR-factor Bc (out, R) and Ac.T (in, R) and take the SVD of the small (R, R) core. The same top singular
    triplets as peft's full SVD of the (out, in) delta (so the same delta B @ A within float32 rounding; a
    factor pair may differ in sign), in milliseconds instead of seconds per module.
    (Conv: B (out, r, 1, ...) and A (r, in, *k) flatten to the (out, in * k...) matrix peft decomposes.)"""
    down_shape, up_shape = sources[0].down.shape, sources[0].up.shape
    ups = torch.cat([s.up.float().flatten(1) for s in sources], dim=1)                                # (out, R)
    downs = torch.cat([s.down.float().flatten(1) * (s.weight * s.scaling) for s in sources], dim=0)  # (R, in)
    q_up, r_up = torch.linalg.qr(ups)
    q_down, r_down = torch.linalg.qr(downs.T)
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    keep = min(new_rank, s.shape[0])
    up = torch.zeros((ups.shape[0], new_rank), dtype=torch.float32)
    down = torch.zeros((new_rank, downs.shape[1]), dtype=torch.float32)
    up[:, :keep] = (q_up @ u[:, :keep]) * s[:keep]      # (out, R') = U S
    down[:keep] = vh[:keep] @ q_down.T                  # (R', in) = Vh
    return down.reshape(new_rank, *down_shape[1:]), up.reshape(up_shape[0], new_rank, *up_shape[2:])
