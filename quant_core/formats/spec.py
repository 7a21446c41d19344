"""A format plus its parameters (``FormatSpec``): what the plan assigns to a layer, how a user's choice
becomes one (``make_spec``), and what to fall back to when a layer's shape does not fit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Type

from ..errors import PlanError
from .base import QuantFormat, get_format
from .fp16 import FP16
from .int8_blockwise import Int8Blockwise
from .int8_tensorwise import Int8Tensorwise


@dataclass(frozen=True)
class FormatSpec:
    """A format plus its parameters: what the plan assigns to a layer."""

    format: str
    params: Any

    @property
    def cls(self) -> Type[QuantFormat]:
        return get_format(self.format)

    def describe(self) -> str:
        return self.cls.describe(self.params)

    def replace(self, **changes) -> "FormatSpec":
        return FormatSpec(self.format, dataclasses.replace(self.params, **changes))


def make_spec(format: str = "int8_tensorwise", scaling_mode: str = "axis", block_size: int = 128,
              convrot: bool = False, convrot_groupsize: int = 256) -> FormatSpec:
    """Build a FormatSpec from the CLI's vocabulary.

    ``format``: int8 | int8_tensorwise | int8_blockwise | fp16 (or any registered name);
    ``scaling_mode``: tensor | axis | block (block selects int8_blockwise).
    """
    fmt = {"int8": Int8Tensorwise.name}.get(format, format)
    if fmt == Int8Tensorwise.name and scaling_mode == "block":
        fmt = Int8Blockwise.name
    if fmt == Int8Tensorwise.name:
        if scaling_mode not in ("tensor", "axis", "row"):
            raise PlanError(f"unknown scaling mode {scaling_mode!r} (tensor, axis, block)")
        return FormatSpec(fmt, Int8Tensorwise.Params(
            scaling="tensor" if scaling_mode == "tensor" else "row",
            convrot=convrot, convrot_groupsize=convrot_groupsize))
    if convrot:
        raise PlanError(f"--convrot is only available with int8_tensorwise per-row scaling, not {fmt}")
    if fmt == Int8Blockwise.name:
        return FormatSpec(fmt, Int8Blockwise.Params(group_size=block_size))
    cls = get_format(fmt)
    return FormatSpec(fmt, cls.Params())


def fallback_chain(spec: FormatSpec) -> List[FormatSpec]:
    """Formats to try, in order, when a layer's shape does not fit ``spec``.

    convrot g -> convrot with the next smaller power-of-4 group -> per-row int8 -> fp16;
    blockwise -> per-row int8 -> fp16.
    """
    variants = spec.cls.smaller_variants(spec.params)  # the same format with parameters that fit more shapes
    chain = [spec] + [FormatSpec(spec.format, p) for p in variants]
    if not variants and spec.format != Int8Tensorwise.name and spec.format != FP16.name:
        chain.append(FormatSpec(Int8Tensorwise.name, Int8Tensorwise.Params()))
    if spec.format != FP16.name:
        chain.append(FormatSpec(FP16.name, FP16.Params()))
    return chain


def resolve_fit(spec: FormatSpec, shape) -> Tuple[Optional[FormatSpec], Optional[str]]:
    """First format of the fallback chain that fits ``shape``; with the reason the asked one did not."""
    first_reason = spec.cls.check_fits(tuple(shape), spec.params)
    if first_reason is None:
        return spec, None
    for cand in fallback_chain(spec)[1:]:
        if cand.cls.check_fits(tuple(shape), cand.params) is None:
            return cand, first_reason
    return None, first_reason
