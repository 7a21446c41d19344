"""``int8_tensorwise``: int8 weights with a float32 scale per tensor or per output row, optionally in the
space of the regular-Hadamard rotation (convrot). Stock ComfyUI (comfy-kitchen) loads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..errors import PlanError
from ..hadamard import CONVROT_GROUP_SIZES, rotate_groups_exact
from .base import RowOrTensorScaled, check_scaling


class Int8Tensorwise(RowOrTensorScaled):
    name = "int8_tensorwise"
    core_loadable = True
    description = ("int8 weights, float32 scale per tensor or per output row, optional regular-"
                   "Hadamard rotation (convrot); W8A8 with per-token activation scales at runtime")

    @dataclass(frozen=True)
    class Params:
        scaling: str = "row"  # "row" ([out,1] scale) or "tensor" (0-dim scale)
        convrot: bool = False
        convrot_groupsize: int = 256

        def __post_init__(self):
            check_scaling("int8_tensorwise", self.scaling)
            if self.convrot:
                if self.scaling != "row":
                    raise PlanError("convrot needs per-row scaling (--scaling_mode axis); "
                                    "tensor scaling with convrot is not a core format")
                # only the sizes stock ComfyUI loads (a power of 4 as large as 65536 would build a 34 GB matrix)
                if isinstance(self.convrot_groupsize, bool) or self.convrot_groupsize not in CONVROT_GROUP_SIZES:
                    raise PlanError("convrot group size must be one of "
                                    f"{', '.join(map(str, CONVROT_GROUP_SIZES))}, got {self.convrot_groupsize!r}")

    @classmethod
    def check_fits(cls, shape, params) -> Optional[str]:
        reason = super().check_fits(shape, params)
        if reason is None and params.convrot and shape[1] % params.convrot_groupsize:
            reason = (f"in_features {shape[1]} is not divisible by convrot group "
                      f"{params.convrot_groupsize}")
        return reason

    @classmethod
    def comfy_quant(cls, params):
        cfg = {"format": cls.name}
        if params.convrot:
            cfg["convrot"] = True
            cfg["convrot_groupsize"] = params.convrot_groupsize
        return cfg

    @classmethod
    def describe(cls, params) -> str:
        return f"int8_tensorwise/{params.scaling}" + (f"+convrot{params.convrot_groupsize}" if params.convrot else "")

    @classmethod
    def rotated(cls, params) -> bool:
        return bool(params.convrot)

    @classmethod
    def smaller_variants(cls, params) -> list:
        """convrot g -> convrot with the next smaller power-of-4 group -> per-row without convrot."""
        if not params.convrot:
            return []
        out, g = [], params.convrot_groupsize // 4
        while g >= 16:
            out.append(dataclasses.replace(params, convrot_groupsize=g))
            g //= 4
        return out + [dataclasses.replace(params, convrot=False)]

    @classmethod
    def params_from_config(cls, cfg, tensors):
        scale = tensors.get("weight_scale")
        scaling = "tensor" if scale is not None and scale.numel() == 1 and scale.dim() == 0 else "row"
        return cls.Params(scaling=scaling, convrot=bool(cfg.get("convrot", False)),
                          convrot_groupsize=int(cfg.get("convrot_groupsize", 256)))

    @classmethod
    def to_storage(cls, w, params):
        return rotate_groups_exact(w, params.convrot_groupsize) if params.convrot else w

    @classmethod
    def from_storage(cls, w, params):
        return rotate_groups_exact(w, params.convrot_groupsize) if params.convrot else w

