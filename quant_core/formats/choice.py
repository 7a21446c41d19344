"""One function from a user's choice to a ``FormatSpec``: the CLI's flags, the Quantize and on-the-fly
nodes' widgets and every layer-config entry all come through ``spec_from_choice``, so the same choice
writes the same file whichever way it was made. Rules on a format's own parameters are checked once, in
its ``Params``; the rules here are the ones that tie a format to the rest of the choice (the optimizer,
SmoothQuant).

The vocabulary (``docs/FORMATS.md``):

* ``format``: a registered format name, or ``int8`` (= ``int8_tensorwise``), ``fp8`` (= ``float8_e4m3fn``,
  per-tensor scale); ``None`` = ``int8``;
* ``scaling``: ``axis`` / ``row`` (one scale per output row: the same thing under two names),
  ``tensor``, or ``block`` (int8: selects ``int8_blockwise``); ignored by formats without a scale choice;
* ``block_size``: the tile of ``int8_blockwise``; ``convrot`` / ``convrot_groupsize``: the regular-
  Hadamard rotation of ``int8_tensorwise`` (per-row scales only);
* ``optimizer``: ``quip`` on per-row ``int8_tensorwise`` stores its incoherence as convrot (QuIP without
  a rotation is plain LDLQ); ``int8_quip`` is written by ``quip`` (or round-to-nearest) only;
* ``smoothquant``: per-row / tensor ``int8_tensorwise`` becomes ``int8_smoothquant`` (fp16 stays fp16).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..errors import PlanError
from .base import get_format
from .int8_blockwise import Int8Blockwise
from .int8_quip import Int8QuIP
from .int8_smoothquant import Int8SmoothQuant
from .int8_tensorwise import Int8Tensorwise
from .spec import FormatSpec

FORMAT_ALIASES = {"int8": Int8Tensorwise.name, "fp8": "float8_e4m3fn"}
SCALINGS = {"axis": "row", "row": "row", "tensor": "tensor", "block": "block"}
RTN_OPTIMIZERS = (None, "rtn")


def spec_from_choice(format: Optional[str] = None, scaling: Optional[str] = None,
                     block_size: Optional[int] = None, convrot: bool = False,
                     convrot_groupsize: Optional[int] = None, optimizer: Optional[str] = None,
                     smoothquant: bool = False) -> FormatSpec:
    """The ``FormatSpec`` a user's choice means (see the module docstring); ``PlanError`` naming the
    conflict when the choice has none."""
    name = FORMAT_ALIASES.get(format or "int8", format)
    if scaling is not None and scaling not in SCALINGS:
        raise PlanError(f"unknown scaling mode {scaling!r} (tensor, axis, block)")
    scaling = SCALINGS.get(scaling)
    if name == Int8Tensorwise.name and scaling == "block":
        name = Int8Blockwise.name
    cls = get_format(name)
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    kw = {}
    if "scaling" in fields and scaling in ("row", "tensor"):
        kw["scaling"] = scaling
    if "group_size" in fields and block_size is not None:
        kw["group_size"] = block_size
    if optimizer == "quip" and name == Int8Tensorwise.name and kw.get("scaling", "row") == "row":
        convrot = True  # QuIP keeps its incoherence in the file: core convrot
    if name == Int8QuIP.name and optimizer not in RTN_OPTIMIZERS + ("quip",):
        raise PlanError(f"format int8_quip stores QuIP's rotated weight with its random signs: use optimizer "
                        f"quip (or rtn), not {optimizer}")
    if convrot:
        if "convrot" not in fields:
            raise PlanError(f"--convrot is only available with int8_tensorwise per-row scaling, not {name}")
        kw["convrot"] = True
    if "convrot_groupsize" in fields and convrot_groupsize is not None:
        kw["convrot_groupsize"] = convrot_groupsize
    spec = FormatSpec(name, cls.Params(**kw))
    return with_smoothquant(spec) if smoothquant else spec


def with_smoothquant(spec: FormatSpec) -> FormatSpec:
    """The SmoothQuant rule: per-row / tensor ``int8_tensorwise`` -> ``int8_smoothquant`` with the same
    scaling; fp16 and ``int8_smoothquant`` unchanged; anything else (rotated, block-wise) refused."""
    if spec.format in ("fp16", Int8SmoothQuant.name):
        return spec
    if spec.format != Int8Tensorwise.name or spec.params.convrot:
        raise PlanError("SmoothQuant stores int8_smoothquant (per-row or tensor scales, no rotation); it cannot "
                        f"be combined with {spec.describe()}")
    return FormatSpec(Int8SmoothQuant.name, Int8SmoothQuant.Params(scaling=spec.params.scaling))


def make_spec(format: str = "int8_tensorwise", scaling_mode: str = "axis", block_size: int = 128,
              convrot: bool = False, convrot_groupsize: int = 256) -> FormatSpec:
    """``spec_from_choice`` with the CLI's defaults (the older name, kept for callers)."""
    return spec_from_choice(format, scaling_mode, block_size, convrot, convrot_groupsize)
