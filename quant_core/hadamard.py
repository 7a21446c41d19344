"""Hadamard matrices used by the rotated ("convrot") formats.

The core-compatible rotation is the *regular* Hadamard matrix of size g = 4^k, the Kronecker power of
``[[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]`` divided by sqrt(g) -- the same matrix comfy-kitchen
builds, so files we write dequantize identically in stock ComfyUI. It is symmetric and orthogonal,
hence its own inverse: rotating twice gives back the input.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from .errors import PlanError

CONVROT_GROUP_SIZES = (16, 64, 256, 1024)

_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))


def is_power_of_4(n: int) -> bool:
    return n >= 4 and (n & (n - 1)) == 0 and (n.bit_length() - 1) % 2 == 0


@lru_cache(maxsize=16)
def _regular_hadamard_f64(size: int) -> torch.Tensor:
    h4 = torch.tensor(_H4, dtype=torch.float64)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / math.sqrt(size)


def regular_hadamard(size: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalized regular Hadamard matrix of ``size`` (a power of 4)."""
    if not is_power_of_4(size):
        raise PlanError(f"convrot group size must be a power of 4 (16, 64, 256, 1024), got {size}")
    return _regular_hadamard_f64(size).to(device=device, dtype=dtype)


def rotate_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Apply ``blockdiag(H)`` along the last dimension: ``x · blockdiag(H)ᵀ``.

    Works for weights ``[out, in]`` (giving the stored ``W_rot``) and for activations ``[..., in]``.
    Because H is symmetric and orthogonal, the same call also undoes the rotation.
    """
    n = x.shape[-1]
    if n % group_size:
        raise PlanError(f"last dimension {n} is not divisible by convrot group size {group_size}")
    h = regular_hadamard(group_size, device=x.device, dtype=x.dtype)
    shape = x.shape
    return torch.matmul(x.reshape(-1, n // group_size, group_size), h.T).reshape(shape)


def rotate_groups_exact(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rotate_groups`` for weights: when the float32 product overflows (rows near float32's largest
    value: the partial sums of a group reach up to sqrt(g) times the largest entry), the rotation is
    redone in float64 and rounded once, so only values that really exceed float32's range become Inf
    (and the pipeline's final check refuses the layer with that reason)."""
    out = rotate_groups(x, group_size)
    if out.dtype == torch.float32 and not bool(torch.isfinite(out).all()) and bool(torch.isfinite(x).all()):
        out = rotate_groups(x.double(), group_size).float()
    return out
