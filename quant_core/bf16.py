"""bf16 compute for the Hadamard rotations (``--bf16-compute``): the helpers the memory policy decides
about and the optimizers call. Everything that accumulates error stays float32/float64."""
from __future__ import annotations

from typing import Callable, Dict

import torch


def _cuda_bf16_supported(dev: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability(dev)[0] >= 8)
    except Exception:  # pragma: no cover - no driver
        return False


_MM_OUT_DTYPE: Dict[str, bool] = {}


def mm_out_dtype_supported(dev: torch.device) -> bool:
    """Does ``torch.mm(bf16, bf16, out_dtype=torch.float32)`` run on ``dev`` (CUDA in recent torch)?"""
    key = str(dev)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=dev)
            _MM_OUT_DTYPE[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except Exception:
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def rotate_bf16(x: torch.Tensor, rotate: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``rotate(x)`` computed in bf16 (float32 accumulation inside the GEMM, bf16 result), as float32."""
    return rotate(x.to(torch.bfloat16)).float()


def rotate_groups_bf16(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``hadamard.rotate_groups`` with bf16 operands and a float32 result where the GEMM can return one
    (CUDA: exact products, float32 sums -- lossless for a bf16 weight); elsewhere the result is rounded
    to bf16."""
    from .hadamard import regular_hadamard, rotate_groups
    n = x.shape[-1]
    if n % group_size:
        return rotate_groups(x, group_size)  # raises the format's error
    h = regular_hadamard(group_size, device=x.device, dtype=torch.bfloat16)
    xb = x.to(torch.bfloat16).reshape(-1, group_size)
    if x.device.type == "cuda" and mm_out_dtype_supported(x.device):
        out = torch.mm(xb, h.T, out_dtype=torch.float32)
    else:
        out = torch.mm(xb, h.T).float()
    return out.reshape(x.shape)
