"""Formats whose runtime needs extra per-layer tensors carry their own format name, so stock ComfyUI
refuses them (FORMATS.md).

``int8_quip`` (QuIP with the full randomized Hadamard, ``--quip-store-transformed``)
    ``W ≈ T_outᵀ (q · S) T_in`` with ``T = B · diag(signs)``: ``signs`` are random ±1 per channel and
    ``B`` is the block-diagonal normalized Sylvester Hadamard whose block is the largest power of two
    dividing the dimension, at most 4096 (``quip_block_size``). The runtime computes
    ``y = signs_out ⊙ B(W̃ · (B(signs_in ⊙ x)))``: activations enter the int8 GEMM already incoherent.
    Keys: ``weight`` int8 ``[out, in]`` (the transformed weight), ``weight_scale`` float32 ``[out, 1]``,
    ``quip_sign_in`` int8 ``[in]``, ``quip_sign_out`` int8 ``[out]`` (values ±1), ``comfy_quant``
    ``{"format": "int8_quip", "hadamard": "sylvester_blockdiag"}``. Both dimensions must be multiples of 16.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import PlanError, SafetensorsFormatError
from .base import QuantFormat, QuantizedWeight, expand_row_or_tensor_scale, round_to_int8, row_or_tensor_scale

QUIP_MAX_BLOCK = 4096


def quip_block_size(n: int) -> int:
    """Largest power of two dividing ``n``, at most ``QUIP_MAX_BLOCK``."""
    return min(n & -n, QUIP_MAX_BLOCK)


def sylvester_transform(x: torch.Tensor, block: int, dim: int = -1) -> torch.Tensor:
    """``x`` times the block-diagonal normalized Sylvester Hadamard along ``dim`` (fast Walsh-Hadamard,
    O(n log block)); the matrix is symmetric and orthogonal, so the call is its own inverse."""
    if dim != -1 and dim != x.dim() - 1:
        return sylvester_transform(x.transpose(dim, -1), block).transpose(dim, -1).contiguous()
    n = x.shape[-1]
    if n % block or block & (block - 1):
        raise PlanError(f"Hadamard block {block} must be a power of two dividing {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=3)
        h *= 2
    return (y.reshape(*lead, n) * (block ** -0.5)).to(x.dtype)


def random_signs(n: int, seed: int, name: str, device=None) -> torch.Tensor:
    """±1 (int8) per channel, reproducible from ``seed`` and the layer ``name``."""
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8", "surrogatepass"))) % (2 ** 63))
    s = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1
    return s.to(device) if device is not None else s


class Int8QuIP(QuantFormat):
    name = "int8_quip"
    core_loadable = False
    description = ("QuIP: int8 weights in the space of a randomized block Hadamard on both sides "
                   "(random signs stored), per-row scale; our loader only")

    @dataclass(frozen=True)
    class Params:
        hadamard: str = "sylvester_blockdiag"

        def __post_init__(self):
            if self.hadamard != "sylvester_blockdiag":
                raise PlanError(f"int8_quip: unknown hadamard {self.hadamard!r}")

    @staticmethod
    def linear(x, qw, bias, path=None, backend=None):
        return quip_linear(x, qw, bias, path=path, backend=backend)

    @classmethod
    def rotated(cls, params) -> bool:
        return True

    @classmethod
    def check_fits(cls, shape, params) -> Optional[str]:
        reason = super().check_fits(shape, params)
        if reason is None and (shape[0] % 16 or shape[1] % 16):
            reason = f"int8_quip needs both dimensions divisible by 16, got {list(shape)}"
        return reason

    @classmethod
    def scale_shape(cls, shape, params):
        return (shape[0], 1)

    @classmethod
    def extra_specs(cls, shape, params):
        return [("quip_sign_in", torch.int8, (shape[1],)), ("quip_sign_out", torch.int8, (shape[0],))]

    @classmethod
    def comfy_quant(cls, params):
        return {"format": cls.name, "hadamard": params.hadamard}

    @classmethod
    def params_from_config(cls, cfg, tensors):
        q = tensors.get("weight")
        for key, dim in (("quip_sign_in", 1), ("quip_sign_out", 0)):
            s = tensors.get(key)
            if s is None:
                raise SafetensorsFormatError(f"int8_quip layer without its {key} tensor")
            if s.dtype != torch.int8 or s.dim() != 1 or (q is not None and s.shape[0] != q.shape[dim]):
                raise SafetensorsFormatError(f"{key} must be int8 [{q.shape[dim] if q is not None else 'n'}], "
                                             f"got {s.dtype} {list(s.shape)}")
            if not bool((s.abs() == 1).all()):
                raise SafetensorsFormatError(f"{key} must hold only +1 and -1")
        return cls.Params(hadamard=str(cfg.get("hadamard", "sylvester_blockdiag")))

    @classmethod
    def transform(cls, w: torch.Tensor, sign_out: torch.Tensor, sign_in: torch.Tensor) -> torch.Tensor:
        """``T_out W T_inᵀ`` (float32)."""
        out, inn = w.shape
        x = w.float() * sign_in.to(w.device, torch.float32).reshape(1, -1)
        x = sylvester_transform(x, quip_block_size(inn), dim=1)
        x = x * sign_out.to(w.device, torch.float32).reshape(-1, 1)
        return sylvester_transform(x, quip_block_size(out), dim=0)

    @classmethod
    def untransform(cls, wt: torch.Tensor, sign_out: torch.Tensor, sign_in: torch.Tensor) -> torch.Tensor:
        """``T_outᵀ W̃ T_in`` (float32): the inverse of ``transform``."""
        out, inn = wt.shape
        x = sylvester_transform(wt.float(), quip_block_size(out), dim=0)
        x = x * sign_out.to(wt.device, torch.float32).reshape(-1, 1)
        x = sylvester_transform(x, quip_block_size(inn), dim=1)
        return x * sign_in.to(wt.device, torch.float32).reshape(1, -1)

    @classmethod
    def transform_hessian(cls, h: torch.Tensor, sign_in: torch.Tensor) -> torch.Tensor:
        """``T_in H T_inᵀ``: the input second moment in the transformed space."""
        b = quip_block_size(h.shape[0])
        d = sign_in.to(h.device, h.dtype)
        x = sylvester_transform(h * d.reshape(1, -1), b, dim=1)
        return sylvester_transform(x * d.reshape(-1, 1), b, dim=0)

    @classmethod
    def compute_scale(cls, ws, params):
        return row_or_tensor_scale(ws, "row")

    @classmethod
    def expand_scale(cls, scale, shape, params):
        return expand_row_or_tensor_scale(scale, shape, "row")

    @classmethod
    def pack_transformed(cls, q, scale, sign_out, sign_in, params, orig_dtype) -> QuantizedWeight:
        return QuantizedWeight(cls.name, params, q.to(torch.int8).contiguous(), scale.float().contiguous(),
                               orig_dtype, {"quip_sign_in": sign_in.to("cpu", torch.int8).contiguous(),
                                            "quip_sign_out": sign_out.to("cpu", torch.int8).contiguous()})

    @classmethod
    def quantize(cls, w, params, orig_dtype=None, seed: int = 0, name: str = ""):
        """Round to nearest in the transformed space, with signs drawn from ``seed`` and ``name``."""
        out, inn = w.shape
        so, si = random_signs(out, seed, name + ":out"), random_signs(inn, seed, name + ":in")
        wt = cls.transform(w.float(), so, si)
        scale = cls.compute_scale(wt, params)
        q = round_to_int8(wt / cls.expand_scale(scale, wt.shape, params))
        return cls.pack_transformed(q, scale, so, si, params, orig_dtype or w.dtype)

    @classmethod
    def dequantize(cls, qw):
        wt = cls.dequantize_storage(qw)
        return cls.untransform(wt, qw.extra["quip_sign_out"], qw.extra["quip_sign_in"])


def quip_linear(x, qw, bias, path=None, backend=None):
    """Rotate activations into the weight's space, int8 GEMM, rotate the output back, add the bias."""
    from ... import kernels
    n_out, n_in = qw.qdata.shape
    si = qw.extra["quip_sign_in"].to(device=x.device, dtype=torch.float32)
    so = qw.extra["quip_sign_out"].to(device=x.device, dtype=torch.float32)
    xt = sylvester_transform(x.float() * si, quip_block_size(n_in)).to(x.dtype)
    yt = kernels.int8_linear(xt, qw.qdata, qw.scale, None, out_dtype=torch.float32, path=path, backend=backend)
    y = sylvester_transform(yt, quip_block_size(n_out)) * so
    if bias is not None:
        y = y + bias.to(device=x.device, dtype=torch.float32)
    return y.to(x.dtype)
