"""``int8_blockwise``: int8 weights with one float32 scale per group_size x group_size tile (our loader
only; stock ComfyUI refuses it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import PlanError
from .base import QuantFormat, _absmax_scale, _round_temp_to_int8


class Int8Blockwise(QuantFormat):
    name = "int8_blockwise"
    core_loadable = False
    description = ("int8 weights, float32 scale per group_size x group_size tile; W8A8 with per-token "
                   "per-K-block activation scales in our kernels (stock ComfyUI refuses it)")

    @dataclass(frozen=True)
    class Params:
        group_size: int = 128

        def __post_init__(self):
            if not isinstance(self.group_size, int) or self.group_size < 16 or self.group_size % 16 \
                    or self.group_size > 4096:
                raise PlanError("int8_blockwise group_size must be a multiple of 16 between 16 and 4096, "
                                f"got {self.group_size}")

    @classmethod
    def check_fits(cls, shape, params):
        reason = super().check_fits(shape, params)
        if reason is None and shape[1] % params.group_size:
            reason = f"in_features {shape[1]} is not divisible by block size {params.group_size}"
        return reason

    @classmethod
    def scale_shape(cls, shape, params):
        g = params.group_size
        return (math.ceil(shape[0] / g), math.ceil(shape[1] / g))

    @classmethod
    def comfy_quant(cls, params):
        return {"format": cls.name, "group_size": params.group_size}

    @classmethod
    def describe(cls, params) -> str:
        return f"int8_blockwise/{params.group_size}"

    @classmethod
    def params_from_config(cls, cfg, tensors):
        return cls.Params(group_size=int(cfg.get("group_size", 128)))

    @staticmethod
    def _tile_view(x: torch.Tensor, g: int) -> torch.Tensor:
        """[out, in] -> [ceil(out/g), g, in/g, g] (rows zero-padded only when out is ragged)."""
        out, inn = x.shape
        pad = (-out) % g
        if pad:
            x = torch.cat([x, x.new_zeros(pad, inn)], 0)
        return x.reshape(-1, g, inn // g, g)

    @classmethod
    def compute_scale(cls, ws, params):
        tiles = cls._tile_view(ws, params.group_size)
        return _absmax_scale(tiles.abs().amax(dim=(1, 3)))

    @classmethod
    def expand_scale(cls, scale, shape, params):
        g = params.group_size
        s = scale.float().repeat_interleave(g, 0).repeat_interleave(g, 1)
        return s[: shape[0], : shape[1]]

    @classmethod
    def quantize(cls, w, params, orig_dtype=None):
        # same numbers as the generic path, without materializing the per-element scale matrix
        orig_dtype = orig_dtype or w.dtype
        g = params.group_size
        ws = w.float()
        tiles = cls._tile_view(ws, g)
        scale = _absmax_scale(tiles.abs().amax(dim=(1, 3)))
        q = _round_temp_to_int8(tiles / scale[:, None, :, None]).reshape(-1, ws.shape[1])[: ws.shape[0]]
        return cls.pack(q, scale, params, orig_dtype)

    @classmethod
    def dequantize_storage(cls, qw):
        g = qw.params.group_size
        tiles = cls._tile_view(qw.qdata, g).float()
        return tiles.mul_(qw.scale.float()[:, None, :, None]).reshape(-1, qw.qdata.shape[1])[: qw.qdata.shape[0]]
