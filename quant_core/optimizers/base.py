"""What every optimizer shares: the per-layer context, the result, the registry (with each optimizer's
memory and time estimate, declared beside it) and the check of the options dict. Imports nothing else of
the optimizers package, so every optimizer module can import it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from ..errors import PlanError
from ..formats import FormatSpec, QuantizedWeight
from .options import LayerDecisions, OptimizerOptions, layer_options, option_kinds


@dataclass
class LayerContext:
    """One layer's inputs to an optimizer. ``options``: the typed ``OptimizerOptions`` (a dict is
    checked and converted; its decision keys become ``decisions``); ``decisions``: what the pipeline
    decided for this layer (row segments, Hessian device, bf16 rotations), apart from the options."""

    base: str
    device: torch.device = torch.device("cpu")
    stats: Optional[Any] = None  # calibration statistics for this layer's input, if any
    options: OptimizerOptions = field(default_factory=OptimizerOptions)  # from the CLI / node / API
    orig_dtype: torch.dtype = torch.bfloat16
    log: Callable[[str], None] = lambda msg: None
    lora_delta: Optional[torch.Tensor] = None  # --calibration-lora: this layer's LoRA weight delta, if any
    decisions: Optional[LayerDecisions] = None

    def __post_init__(self):
        self.options = layer_options(self.options, self.decisions)
        self.decisions = self.options.decisions


@dataclass
class OptimizerResult:
    qw: QuantizedWeight
    info: Dict[str, Any] = field(default_factory=dict)  # objective before/after, iterations, notes


OptimizerFn = Callable[[torch.Tensor, FormatSpec, LayerContext], OptimizerResult]
OPTIMIZERS: Dict[str, OptimizerFn] = {}


@dataclass(frozen=True)
class LayerEstimate:
    """Bytes a layer's optimizer holds on its device at the same time (float32 unless noted)."""

    weight: int  # weight, its storage-space copy, scales, temporaries, integers, quality check
    sweep: int  # GPTQ/LDLQ per-segment working rows (divided by the number of row segments)
    hessian: int  # H (objective + data copy + the sweep's clone)
    factor: int  # float64 Cholesky of H and H⁻¹ (movable to the CPU)

    def total(self, segments: int = 1, factor_on_device: bool = True) -> int:
        return (self.weight + -(-self.sweep // max(segments, 1)) + self.hessian
                + (self.factor if factor_on_device else self.hessian // 3))


@dataclass(frozen=True)
class OptimizerCost:
    """What an optimizer declares beside itself for the memory policy (``memory.place_layer``) and the
    multi-rank work split (``distributed.layer_cost``).

    ``estimate(out, in, rotated)``: its working set on one layer [out, in] (factors read off its code,
    checked against measured peak VRAM by ``benchmarks/scale.py``); ``row_sweep``: it runs the GPTQ/LDLQ
    row sweep over a factored Hessian, so a placement may split rows and factor on the CPU;
    ``time(out, in)``: relative run time, only compared between layers."""

    estimate: Callable[[int, int, bool], LayerEstimate]
    row_sweep: bool = False
    time: Callable[[int, int], float] = lambda out, inn: float(out) * inn
    release: Optional[Callable[[], None]] = None  # drops caches it keeps between layers (GPU memory)
    integer_grid_only: bool = False  # only rounds to integers: refused for float8 before any work (none today)


def _rtn_estimate(out: int, inn: int, rotated: bool) -> LayerEstimate:
    # round-to-nearest: w (float32), ws / w/scale temporary, int8, dequantized copy for the report
    n = out * inn
    return LayerEstimate(weight=13 * n + (4 * n if rotated else 0), sweep=0, hessian=0, factor=0)


RTN_COST = OptimizerCost(_rtn_estimate)
OPTIMIZER_COSTS: Dict[str, OptimizerCost] = {}


def register_optimizer(name: str, cost: OptimizerCost = RTN_COST):
    """Decorator: register ``fn`` as optimizer ``name`` with its memory / time estimate."""
    def deco(fn: OptimizerFn) -> OptimizerFn:
        if name in OPTIMIZERS and OPTIMIZERS[name] is not fn:
            raise ValueError(f"optimizer {name!r} registered twice")
        OPTIMIZERS[name] = fn
        OPTIMIZER_COSTS[name] = cost
        return fn
    return deco


def optimizer_cost(name: str) -> OptimizerCost:
    """The estimate ``name`` declared (round-to-nearest's for a name not registered)."""
    return OPTIMIZER_COSTS.get(name, RTN_COST)


def get_optimizer(name: str) -> OptimizerFn:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise PlanError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}") from None


# Every key ``ConvertOptions.optimizer_options`` may hold and its JSON kind, from the typed options
# (``options.py``); ``check_optimizer_options`` refuses unknown keys, wrong types and out-of-range values.
OPTIMIZER_OPTIONS: Dict[str, Any] = option_kinds()


def check_optimizer_options(options: Optional[Dict[str, Any]], where: str = "optimizer_options") -> None:
    """Refuse an options dict with unknown keys or values of the wrong JSON type, naming the key."""
    OptimizerOptions.from_dict(options, where)
