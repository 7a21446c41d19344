"""Per-layer random numbers and deterministic GPU math: a conversion gives the same bytes whatever the
order of its layers, however they are spread over ranks (split out of ``memory.py``)."""
from __future__ import annotations

import contextlib
import os
import zlib
from typing import Optional

import torch


def layer_seed(base: str, seed: Optional[int] = None) -> int:
    """A seed that depends only on the layer's name and ``--manual_seed``: a layer draws the same random
    numbers (randomized SVD of the weight-only objective, ...) whatever ran before it, so the order of
    layers -- and how they are spread over ranks -- never changes the output."""
    return (zlib.crc32(base.encode("utf-8", "surrogatepass")) + 0x9E3779B97F4A7C15 * int(seed or 0)) % (1 << 63)


@contextlib.contextmanager
def layer_rng(base: str, device: torch.device, seed: Optional[int] = None):
    """Seed the CPU generator and ``device``'s CUDA generator for one layer, restoring both after."""
    s = layer_seed(base, seed)
    cuda_devs = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devs):
        torch.default_generator.manual_seed(s)
        for d in cuda_devs:
            torch.cuda.default_generators[d].manual_seed(s)
        yield


def enable_deterministic_gpu_math():
    """Bit-reproducible float32 GEMMs on CUDA: no TF32, a fixed cuBLAS workspace (must be set before
    cuBLAS starts). Reductions in torch are already deterministic for a given shape and device."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
