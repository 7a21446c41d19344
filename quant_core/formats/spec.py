"""A format plus its parameters (``FormatSpec``): what the plan assigns to a layer, and what to fall
back to when a layer's shape does not fit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple, Type

from .base import QuantFormat, get_format
from .fp16 import FP16
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
