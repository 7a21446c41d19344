"""Learned rounding (``--optimizer original|adamw|radam``): choose, per weight, rounding down or up.

With the scales fixed (clipped abs-max search weighted by ``diag(H)``), every weight may take
``floor(t)`` or ``floor(t) + 1`` of a continuous target ``t`` (in units of its scale). A continuous
``h ∈ [0, 1]`` per weight (start: the fraction of ``t``) is optimized on

    L(h) = tr(D H Dᵀ) / e_ref  +  λ · mean(1 − |2h − 1|^β),    D = S ⊙ (floor(t) + h) − W

(the layer-output error through the calibration Hessian, or the weight-only SVD-weighted error without
data; see ``objective.py``; ``e_ref`` = the starting point's error). The regularizer, off for the first
20% of the iterations, then pushes ``h`` to 0 or 1 while ``β`` anneals from 20 to 2 (AdaRound, Nagel et
al. 2020, with ``h`` itself as the variable, projected onto [0, 1]; ``λ`` = 10). Every ``eval_every``
steps the *hard* rounding ``floor(t) + (h ≥ ½)`` is scored on the true objective; the best hard rounding
wins, and round-to-nearest is kept if nothing beats it.

The pipeline of one layer (issue 17: GPTQ-like cost; docs/OPTIMIZERS.md has the measurements):

1. **start** from the best cheap solution (``--rounding-init``, default ``auto``): GPTQ's
   error-compensated values with calibration data, the weight itself (round-to-nearest) without. With
   data, GPTQ runs three times (``start_candidates``: as ``--optimizer gptq`` runs it, with act-order, and
   with act-order on the plain abs-max scale) and the lowest objective wins per row (per-row scales; the
   whole layer otherwise): the start is never worse than ``--optimizer gptq`` on the objective, and the
   result never ends above its start;
2. **learn** (``--num_iter`` steps at most) with the whole iteration on the device: every row of the
   layer in one tensor program, the gradient ``D H`` as one GEMM (bf16 operands on CUDA, fp32
   accumulation: only its direction matters; the hard objective is always fp32), the regularizer's
   gradient in closed form (no autograd), the optimizers (sign descent, AdamW, RAdam) and the
   learning-rate schedules as tensor arithmetic, best-rounding bookkeeping with ``torch.where`` -- so
   there is no host sync per step. On CUDA a chunk of ``eval_every`` steps plus the evaluation is
   captured once into a CUDA graph and replayed. Stop criteria are evaluated on the device after every
   evaluation exactly as documented; a stopped layer freezes (later steps change nothing), and the host
   looks at the flag only every ``SYNC_EVERY`` steps, so the result does not depend on when it looks;
3. **early stop by default**: ``--early-stop-stall`` defaults to ``DEFAULT_STALL`` steps without a better
   hard rounding (an explicit value is honoured; one ≥ ``--num_iter`` switches it off);
4. **polish**: coordinate descent on the hard rounding (every weight takes its best integer with the
   others fixed; never raises the objective), its column sweep replayed from a CUDA graph like GPTQ's;
5. **scale refit** (per-row and per-tensor scales): with the integers fixed, the scale that minimizes
   ``tr(D H Dᵀ)`` is closed-form; kept only where it lowers the objective, then polished again.

Optimizers: ``original`` -- sign descent (every weight moves by ``lr`` against its gradient);
``adamw`` / ``radam`` -- the update rules of ``torch.optim.AdamW`` (no weight decay) / ``RAdam``, written
out as tensor arithmetic (tests compare them with torch's). Learning-rate schedules (``--lr_schedule``):
``adaptive`` -- "bold driver": ×(1/lr_gamma) after a step that did not raise the loss by more than
``lr_threshold`` (relative), ×lr_factor after one that did (then ``lr_cooldown`` steps without change),
capped at 10× the initial rate; ``exponential`` -- ×lr_gamma every step; ``plateau`` -- ×lr_factor when the
hard objective has not improved by ``lr_threshold`` for ``lr_patience`` evaluations (then ``lr_cooldown``
evaluations of cooldown). All stay ≥ ``lr_min``. Early stopping: ``--early-stop-loss`` (hard objective
relative to the start ≤ value), ``--early-stop-lr`` (rate ≤ value), ``--early-stop-stall`` (steps without a
better hard rounding).

``CTQ_LEARNED_ROUNDING=legacy`` (benchmarks only) runs the algorithm as it was before issue 17
(``learned_rounding_legacy.py``) for the before/after comparison.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..checkpoint import checkpoint, progress_span
from ..errors import PlanError
from ..formats import QMAX, FormatSpec
from .base import LayerContext, LayerEstimate, OptimizerCost, OptimizerResult, register_optimizer
from .gptq import CUDA_GRAPHS, DEFAULT_BLOCK, DEFAULT_DAMP, _gain_db, finish_info, gptq_quantize
from .polish import _tf32, best_polished, polish
from .objective import clip_grid, damped_layer_objective, opt, output_sqnr_db, quad_error, search_scales

SCHEDULES = ("adaptive", "exponential", "plateau")
METHODS = ("original", "adamw", "radam")
WARMUP = 0.2
BETA_START, BETA_END = 20.0, 2.0
DEFAULT_REG = 10.0
ROUNDING_INITS = ("auto", "gptq", "nearest")
DEFAULT_POLISH = 2
DEFAULT_STALL = 50  # --early-stop-stall default (steps without a better hard rounding)
SYNC_EVERY = 50  # steps between host looks at the stop flag
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


@dataclass
class Knobs:
    """Every option learned rounding reads, read in ONE place (``knobs``)."""

    num_iter: int
    lr: float
    eval_every: int
    reg: float
    schedule: str
    lr_gamma: float
    lr_factor: float
    lr_patience: int
    lr_cooldown: int
    lr_threshold: float
    lr_min: float
    stop_loss: Optional[float]
    stop_lr: Optional[float]
    stop_stall: Optional[int]
    allow_tf32: bool
    bf16_grad: bool
    rounding_init: str
    polish_sweeps: int
    damp: float
    gptq_block: int
    gptq_actorder: bool
    row_segments: int
    hessian_device: Optional[str]


def knobs(o) -> Knobs:
    o = o or {}
    schedule = str(opt(o, "lr_schedule", "adaptive"))
    if schedule not in SCHEDULES:
        raise PlanError(f"unknown --lr_schedule {schedule!r} ({', '.join(SCHEDULES)})")
    init = str(opt(o, "rounding_init", "auto"))
    if init not in ROUNDING_INITS:
        raise PlanError(f"unknown rounding init {init!r} ({', '.join(ROUNDING_INITS)})")
    stall = opt(o, "early_stop_stall", DEFAULT_STALL)
    return Knobs(
        num_iter=int(opt(o, "num_iter", 1000)), lr=float(opt(o, "lr", 8.0773e-3)),
        eval_every=max(1, int(opt(o, "eval_every", 10))), reg=float(opt(o, "round_reg", DEFAULT_REG)),
        schedule=schedule, lr_gamma=float(opt(o, "lr_gamma", 0.99)), lr_factor=float(opt(o, "lr_factor", 0.5)),
        lr_patience=int(opt(o, "lr_patience", 10)), lr_cooldown=int(opt(o, "lr_cooldown", 0)),
        lr_threshold=float(opt(o, "lr_threshold", 0.0)), lr_min=float(opt(o, "lr_min", 1e-8)),
        stop_loss=None if o.get("early_stop_loss") is None else float(o["early_stop_loss"]),
        stop_lr=None if o.get("early_stop_lr") is None else float(o["early_stop_lr"]),
        stop_stall=int(stall) if stall else None,
        allow_tf32=bool(opt(o, "allow_tf32", True)), bf16_grad=bool(opt(o, "allow_tf32", True)),
        rounding_init=init, polish_sweeps=int(opt(o, "polish_sweeps", DEFAULT_POLISH)),
        damp=float(opt(o, "gptq_damp", DEFAULT_DAMP)), gptq_block=int(opt(o, "gptq_block_size", DEFAULT_BLOCK)),
        gptq_actorder=bool(opt(o, "gptq_actorder", False)), row_segments=int(opt(o, "row_segments", 1)),
        hessian_device=opt(o, "hessian_device", None))


# ------------------------------------------------------------------------------------------------
# the learning phase: state on the device, one iteration = tensor arithmetic only
# ------------------------------------------------------------------------------------------------
STOP_CODES = {0: "num_iter", 1: "early_stop_loss", 2: "early_stop_stall", 3: "early_stop_lr"}


class _Learner:
    """All state of one layer's learning phase as tensors on its device; ``chunk(n, eval)`` runs ``n``
    steps (then one evaluation of the hard rounding) without reading anything back to the host."""

    def __init__(self, ws, h, full, method, k: Knobs, e_ref: float, target):
        dev = ws.device
        f64 = dict(device=dev, dtype=torch.float64)
        self.k, self.method = k, method
        self.ws, self.h, self.full = ws, h, full
        self.h_grad = h.to(torch.bfloat16) if k.bf16_grad else None  # knobs_for: CUDA only
        self.e_ref = float(e_ref)
        x = ws / full if target is None else target
        base = torch.floor(x)
        fixed = (base < -QMAX) | (base > QMAX - 1)  # clipped weights: their integer is ±127, not learned
        self.base = torch.where(fixed, torch.round(x).clamp(-QMAX, QMAX), base)
        self.free = (~fixed).float()
        self.n_free = max(float(self.free.sum()), 1.0)
        self.soft = torch.where(fixed, torch.zeros_like(x), x - base).contiguous()
        self.m = torch.zeros_like(self.soft) if method != "original" else None
        self.v = torch.zeros_like(self.soft) if method != "original" else None
        self.warm = int(WARMUP * k.num_iter)
        self.it = torch.zeros((), **f64)  # steps taken (the iteration index of the old loop)
        self.t = torch.zeros((), **f64)  # optimizer steps (== it while active)
        self.lr = torch.full((), k.lr, **f64)
        self.active = torch.ones((), device=dev, dtype=torch.bool)
        self.code = torch.zeros((), device=dev, dtype=torch.int64)
        self.last_loss = torch.full((), float("nan"), **f64)
        self.cool = torch.zeros((), **f64)
        self.plat_best = torch.full((), float("inf"), **f64)
        self.plat_bad = torch.zeros((), **f64)
        self.stalled = torch.zeros((), **f64)
        self.eager_steps = 0  # host-side count of eager steps (>= self.it): skips the regularizer in warm-up
        self.best_q = self.hard()
        self.best_e = self._hard_error(self.best_q)
        self.start_e = self.best_e.clone()

    def hard(self):
        return self.base + (self.soft >= 0.5).float() * self.free

    def _hard_error(self, q):
        with _tf32(self.ws.device, False):  # the true objective: full fp32
            d = q * self.full - self.ws
            return ((d @ self.h) * d).sum(dtype=torch.float64)

    def _step(self, eager: bool):
        k, a = self.k, self.active
        af = a.double()
        self.it += af
        d = (self.base + self.soft * self.free) * self.full - self.ws
        if self.h_grad is not None:
            g = (d.to(torch.bfloat16) @ self.h_grad).float()
        else:
            with _tf32(self.ws.device, k.allow_tf32):
                g = d @ self.h
        loss = (d * g).sum(dtype=torch.float64) / self.e_ref
        grad = (2.0 / self.e_ref) * g * self.full * self.free
        # AdaRound regularizer λ·mean(1 − |2h − 1|^β) and its gradient, on after the warm-up
        if eager:
            self.eager_steps += 1
        if not (eager and self.eager_steps <= self.warm):  # (skipped where it is multiplied by 0)
            loss, grad = self._regularize(loss, grad)
        self._apply(grad, loss, af, a)

    def _regularize(self, loss, grad):
        k = self.k
        on = (self.it > self.warm).double()
        tt = ((self.it - self.warm) / max(k.num_iter - self.warm, 1)).clamp(0.0, 1.0)
        beta = BETA_START + (BETA_END - BETA_START) * tt
        u = 2.0 * self.soft - 1.0
        au = u.abs()
        bf = beta.float()
        r = (1.0 - au.pow(bf)) * self.free
        loss = loss + on * (k.reg / self.n_free) * r.sum(dtype=torch.float64)
        grad = grad + ((on * (-2.0 * k.reg / self.n_free)) * beta).float() * au.pow(bf - 1.0) * torch.sign(u) * self.free
        return loss, grad

    def _apply(self, grad, loss, af, a):
        k = self.k
        lr_eff = (self.lr * af).float()
        if self.method == "original":  # sign descent: every weight moves by lr against its gradient
            self.soft.sub_(lr_eff * torch.sign(grad))
        else:
            b1, b2 = ADAM_BETAS
            self.t += af
            t = self.t.clamp(min=1.0)
            self.m.lerp_(grad, ((1.0 - b1) * af).float())
            self.v.add_(((1.0 - b2) * af).float() * (grad * grad - self.v))
            bc1 = 1.0 - torch.pow(b1, t)
            bc2 = 1.0 - torch.pow(b2, t)
            if self.method == "adamw":
                upd = (self.m / bc1.float()) / (self.v.sqrt() / bc2.sqrt().float() + ADAM_EPS)
            else:  # radam
                rho_inf = 2.0 / (1.0 - b2) - 1.0
                rho_t = rho_inf - 2.0 * t * torch.pow(b2, t) / bc2
                rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)).clamp(min=0).sqrt()
                adapt = bc2.sqrt().float() / (self.v.sqrt() + ADAM_EPS)
                upd = (self.m / bc1.float()) * torch.where(rho_t > 5.0, rect.float() * adapt, torch.ones_like(adapt))
            self.soft.sub_(lr_eff * upd)
        self.soft.clamp_(0.0, 1.0)
        # learning-rate schedule (every step)
        lr = self.lr
        if k.schedule == "exponential":
            new = lr * k.lr_gamma
        elif k.schedule == "adaptive":
            cooling = self.cool > 0
            worse = (~torch.isnan(self.last_loss)) & (loss > self.last_loss * (1.0 + k.lr_threshold))
            new = torch.where(cooling, lr, torch.where(worse, lr * k.lr_factor, torch.clamp(lr / k.lr_gamma, max=10.0 * k.lr)))
            cool = torch.where(cooling, self.cool - 1, torch.where(worse, torch.full_like(self.cool, k.lr_cooldown), self.cool))
            self.cool.copy_(torch.where(a, cool, self.cool))
            self.last_loss.copy_(torch.where(a, loss, self.last_loss))
        else:
            new = lr
        self.lr.copy_(torch.where(a, new.clamp(min=k.lr_min), lr))
        self.loss = loss

    def _eval(self):
        k, a = self.k, self.active
        q = self.hard()
        e = self._hard_error(q)
        better = a & (e < self.best_e)
        self.best_q.copy_(torch.where(better, q, self.best_q))
        self.best_e.copy_(torch.where(better, e, self.best_e))
        self.stalled.copy_(torch.where(better, torch.zeros_like(self.stalled),
                                       torch.where(a, self.stalled + k.eval_every, self.stalled)))
        if k.schedule == "plateau":
            imp = e < self.plat_best * (1.0 - k.lr_threshold)
            cooling = self.cool > 0
            bad = self.plat_bad + 1
            cut = (~imp) & (~cooling) & (bad > k.lr_patience)
            nb = torch.where(imp | cut, torch.zeros_like(bad), torch.where(cooling, self.plat_bad, bad))
            nc = torch.where(imp, self.cool, torch.where(cooling, self.cool - 1,
                                                         torch.where(cut, torch.full_like(self.cool, k.lr_cooldown), self.cool)))
            nlr = torch.where(cut, (self.lr * k.lr_factor).clamp(min=k.lr_min), self.lr)
            self.plat_best.copy_(torch.where(a & imp, e, self.plat_best))
            self.plat_bad.copy_(torch.where(a, nb, self.plat_bad))
            self.cool.copy_(torch.where(a, nc, self.cool))
            self.lr.copy_(torch.where(a, nlr, self.lr))
        code = self.code
        if k.stop_loss is not None:
            code = torch.where((code == 0) & a & (self.best_e / self.e_ref <= k.stop_loss), torch.ones_like(code), code)
        if k.stop_stall is not None:
            code = torch.where((code == 0) & a & (self.stalled >= k.stop_stall), torch.full_like(code, 2), code)
        self.code.copy_(code)
        self.active.copy_(a & (code == 0))

    def _lr_check(self):
        if self.k.stop_lr is not None:
            hit = self.active & (self.lr <= self.k.stop_lr)
            self.code.copy_(torch.where(hit, torch.full_like(self.code, 3), self.code))
            self.active.copy_(self.active & ~hit)

    def chunk(self, steps: int, evaluate: bool, eager: bool = True):
        for i in range(steps):
            self._step(eager)
            if evaluate and i == steps - 1:
                self._eval()
            self._lr_check()


GRAPH_MIN_ITERS = 200  # learning runs that may be this long replay a captured chunk (see learn_rounding)


class _ChunkGraph:
    """``_Learner.chunk(n, True)`` captured into a CUDA graph on the learner's own (static) tensors."""

    def __init__(self, learner: _Learner, steps: int):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            learner.chunk(steps, True, eager=False)

    def replay(self):
        self.graph.replay()


def learn_rounding(ws: torch.Tensor, h_obj: torch.Tensor, full_scale: torch.Tensor, method: str, options,
                   e_ref: float, target: Optional[torch.Tensor] = None, cuda_graphs: Optional[bool] = None) -> tuple:
    """Optimize the rounding of ``ws`` (storage space) under ``tr(D H Dᵀ)``; returns
    (best integers, best objective, info). ``target``: the values (in units of the scale) whose floor
    and ceiling are the two choices per weight; default ``ws / full_scale``. ``options``: the option
    dict or a ``Knobs``."""
    k = options if isinstance(options, Knobs) else knobs(options)
    if method not in METHODS:
        raise PlanError(f"unknown learned-rounding method {method!r} ({', '.join(METHODS)})")
    L = _Learner(ws, h_obj, full_scale, method, k, e_ref, target)
    n, E = k.num_iter, k.eval_every
    if cuda_graphs is None:
        # a graph pays for its capture only over a long run: with the default stall stop (50 steps) a
        # layer runs 50 iterations, and on an H200 the eager loop took 0.21 vs 0.37 s for that on a
        # 18432x3072 layer (-8% of the whole Flux-12B projection, same bits; docs/OPTIMIZERS.md)
        cuda_graphs = CUDA_GRAPHS and n >= GRAPH_MIN_ITERS and (k.stop_stall is None or k.stop_stall >= GRAPH_MIN_ITERS)
    use_graph = cuda_graphs and ws.device.type == "cuda" and n >= 2 * E
    graph = None
    if use_graph:
        # the capture records the chunk without running it: the first chunk runs eagerly on a side
        # stream (lazy initialisations, as for GPTQ's sweep), then the rest replays the captured one
        side = torch.cuda.Stream(ws.device)
        side.wait_stream(torch.cuda.current_stream(ws.device))
        with torch.cuda.stream(side):
            L.chunk(E, True)
        torch.cuda.current_stream(ws.device).wait_stream(side)
        done = E
        try:
            graph = _ChunkGraph(L, E)
        except Exception:  # no graph (memory, driver): the eager loop computes the same
            graph = None
    else:
        done = 0
    since_sync = 0
    while done < n:
        steps = min(E, n - done)
        checkpoint(done / max(n, 1))  # cancel / progress (rate-limited)
        if graph is not None and steps == E:
            graph.replay()
        else:
            L.chunk(steps, True)
        done += steps
        since_sync += steps
        if since_sync >= SYNC_EVERY:
            since_sync = 0
            if not bool(L.active):  # one host look per SYNC_EVERY steps
                break
    code = int(L.code)
    info = {"iterations": int(L.it), "stop": STOP_CODES[code], "final_lr": float(L.lr),
            "final_loss": None if n == 0 else float(L.loss), "method": method, "schedule": k.schedule,
            "early_stop_stall": k.stop_stall, "last_q": L.hard()}
    return L.best_q, float(L.best_e), info


# ------------------------------------------------------------------------------------------------
# the start: the best of a few GPTQ runs, chosen per row where rows are independent
# ------------------------------------------------------------------------------------------------
def _row_scaled(spec: FormatSpec, scale: torch.Tensor, ws: torch.Tensor) -> bool:
    return getattr(spec.params, "scaling", None) == "row" and tuple(scale.shape) == (ws.shape[0], 1)


def _row_errors(q: torch.Tensor, full: torch.Tensor, ws: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    with _tf32(ws.device, False):
        d = q * full - ws
        return ((d @ h) * d).sum(dim=1, dtype=torch.float64)


def start_candidates(k: Knobs):
    """(scale, act-order) of the GPTQ runs learned rounding starts from: GPTQ exactly as
    ``--optimizer gptq`` runs it (the searched clipped scale, ``--gptq-actorder`` as given), GPTQ with
    act-order on the same scale, and GPTQ with act-order on the plain abs-max scale (the clip search
    scores round-to-nearest, which is not what GPTQ's error feedback needs)."""
    out = [("searched", k.gptq_actorder), ("searched", True), ("absmax", True)]
    return list(dict.fromkeys(out))


def gptq_start(ws, h, h_fit, spec: FormatSpec, scale, base_scale, k: Knobs):
    """The start of learned rounding with calibration data: GPTQ's error-compensated targets for each of
    ``start_candidates``; the one with the lowest objective ``tr(D H_fit Dᵀ)`` wins, per row where the
    format's scales are per row (rows are independent in the objective), for the whole layer otherwise.
    GPTQ's own result is one of the candidates, so the start is never worse than ``--optimizer gptq``
    on the objective. Returns (target, scale, full scale, info, the start's integers / grid values)."""
    per_row = _row_scaled(spec, scale, ws)
    best = None
    names = []
    for which, actorder in start_candidates(k):
        sc = scale if which == "searched" else base_scale
        full = spec.cls.expand_scale(sc, ws.shape, spec.params)
        q, ginfo = gptq_quantize(ws, h, full, k.gptq_block, actorder, k.damp, k.row_segments,
                                 factor_device=k.hessian_device, return_target=True, grid=spec.cls.grid_round)
        err = _row_errors(q, full, ws, h_fit)
        names.append(f"gptq{' act-order' if actorder else ''}, {which} scale")
        j = len(names) - 1
        if best is None:
            best = [ginfo["target"], sc.clone(), err, torch.zeros(ws.shape[0], dtype=torch.int64, device=ws.device), q]
            continue
        if per_row:
            win = err < best[2]
            best[0] = torch.where(win[:, None], ginfo["target"], best[0])
            best[1] = torch.where(win.reshape(best[1].shape), sc, best[1])
            best[2] = torch.where(win, err, best[2])
            best[3] = torch.where(win, torch.full_like(best[3], j), best[3])
            best[4] = torch.where(win[:, None], q, best[4])
        elif float(err.sum()) < float(best[2].sum()):
            best = [ginfo["target"], sc.clone(), err, torch.full_like(best[3], j), q]
        del q, ginfo
    target, sc, _, idx, q = best
    counts = torch.bincount(idx, minlength=len(names)).tolist()
    info = {names[i]: counts[i] for i in range(len(names))} if per_row else names[int(idx[0])]
    return target, sc, spec.cls.expand_scale(sc, ws.shape, spec.params), info, q


# ------------------------------------------------------------------------------------------------
# scale refit: with the integers fixed, the per-row (per-tensor) scale minimizing tr(D H Dᵀ)
# ------------------------------------------------------------------------------------------------
def refit_scale(q: torch.Tensor, ws: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, spec: FormatSpec):
    """``s = (q H wᵀ) / (q H qᵀ)`` per row (or over the whole tensor): the least-squares scale for fixed
    integers. Returns the new scale, or ``None`` for formats whose scales are not per row / tensor."""
    scaling = getattr(spec.params, "scaling", None)
    with _tf32(ws.device, False):
        qh = q @ h
    if scaling == "row" and tuple(scale.shape) == (ws.shape[0], 1):
        num = (qh * ws).sum(dim=1, dtype=torch.float64)
        den = (qh * q).sum(dim=1, dtype=torch.float64)
        s = torch.where(den > 0, num / den.clamp(min=1e-300), scale.reshape(-1).double())
        s = torch.where(s > 0, s, scale.reshape(-1).double())
        return s.to(scale.dtype).reshape(scale.shape)
    if scaling == "tensor" and scale.numel() == 1:
        num, den = float((qh * ws).sum(dtype=torch.float64)), float((qh * q).sum(dtype=torch.float64))
        if den > 0 and num > 0:
            return torch.full_like(scale, num / den)
    return None


# ------------------------------------------------------------------------------------------------
# one layer
# ------------------------------------------------------------------------------------------------
class _PhaseTimes:
    """Seconds per phase of one layer, with the device synchronised at each mark, when the environment
    has ``CTQ_PHASE_TIMES=1`` (``benchmarks/learned_rounding_speed.py --phases``); otherwise free."""

    def __init__(self, device):
        self.on = os.environ.get("CTQ_PHASE_TIMES") == "1"
        self.device = torch.device(device)
        self.times: dict = {}
        self.t = time.perf_counter()

    def mark(self, name: str) -> None:
        if not self.on:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.t
        self.t = now


def _learned_rounding(method: str, w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    if os.environ.get("CTQ_LEARNED_ROUNDING") == "legacy":  # benchmarks only: the pre-issue-17 algorithm
        from .learned_rounding_legacy import legacy_learned_rounding
        return legacy_learned_rounding(method, w, spec, ctx)
    t0 = time.perf_counter()
    k = knobs(ctx.options)
    # reduced-precision gradient GEMM (bf16 operands, fp32 accumulation) only on CUDA, where it pays
    k.bf16_grad = k.bf16_grad and torch.device(ctx.device).type == "cuda" and w.device.type == "cuda"
    phases = _PhaseTimes(w.device)
    w, ws, obj, h_fit = damped_layer_objective(w, spec, ctx, k.damp)
    float_grid = spec.cls.grid_round is not None  # float8: a non-uniform grid (see grid_spacing)
    base_scale = spec.cls.compute_scale(ws, spec.params)
    base_full = spec.cls.expand_scale(base_scale, ws.shape, spec.params)
    q_rtn = spec.cls.grid_values(ws / base_full)
    e_rtn = quad_error(q_rtn * base_full - ws, h_fit)

    phases.mark("objective")
    scale = search_scales(ws, spec, obj.H.diagonal().clamp(min=0), clip_grid(ctx.options))
    phases.mark("scale search")
    full = spec.cls.expand_scale(scale, ws.shape, spec.params)
    value_full = full
    init = k.rounding_init
    if init == "auto":  # the best cheap start: GPTQ with calibration data, round-to-nearest without
        init = "gptq" if obj.source == "calibration" else "nearest"
    target = None
    if init == "gptq":
        with progress_span(0.0, 0.2):
            target, scale, full, info_start, q_gptq = gptq_start(ws, obj.H, h_fit, spec, scale, base_scale, k)
        value_full = full
        start = (q_gptq, scale, full, quad_error(q_gptq * full - ws, h_fit))
        del q_gptq
        phases.mark("gptq start")
    if float_grid:
        # on a float grid every weight chooses between the two grid values around its target (GPTQ's
        # error-compensated value, or the weight), consecutive multiples of the local spacing there:
        # learning and polish run on those "integers" with the spacing folded into an elementwise scale;
        # the result is snapped back to the grid at the end
        step = grid_spacing(ws / value_full if target is None else target)
        full = value_full * step
        if target is not None:
            target = target / step
    # the regularizer weight is relative to the starting point's error (what is left to gain)
    x0 = ws / full if target is None else target
    q_start = torch.round(x0).clamp_(-QMAX, QMAX)
    e_init = quad_error(q_start * full - ws, h_fit)
    del q_start, x0
    with progress_span(0.2 if init == "gptq" else 0.0, 0.9):
        q, e, info = learn_rounding(ws, h_fit, full, method, k, max(e_init, 1e-30), target)
    del target
    phases.mark("learn")
    last_q = info.pop("last_q")
    info["objective_learned"] = e
    sweeps = k.polish_sweeps
    if sweeps > 0:
        # polish the best rounding seen and, when the learning ran its whole schedule (the regularizer
        # binarized it), where it ended: different local optima, either may win. A layer stopped early
        # ended half-way through the relaxation: only its best rounding is worth a polish.
        with progress_span(0.9, 0.97):
            starts = [q] + ([last_q] if info["stop"] == "num_iter" and not torch.equal(last_q, q) else [])
            q, e, j = best_polished(starts, ws, full, h_fit, sweeps, quad_error)
        info["polished"] = ["best rounding seen", "final learned rounding"][j]
    del last_q
    phases.mark("polish")
    if float_grid:  # back to grid values in units of the scale (snapped: polish may leave the two choices)
        q = spec.cls.grid_values(q * step)
        full = value_full
        e = quad_error(q * full - ws, h_fit)
    # the scale that fits the chosen integers best (per-row / per-tensor formats), then a last polish
    new_scale = None if float_grid else refit_scale(q, ws, h_fit, scale, spec)
    if new_scale is not None:
        new_full = spec.cls.expand_scale(new_scale, ws.shape, spec.params)
        q2 = polish(q, ws, new_full, h_fit, max(sweeps, 1)) if sweeps > 0 else q
        e2 = quad_error(q2 * new_full - ws, h_fit)
        info["scale_refit"] = bool(e2 < e)
        if e2 < e:
            q, e, scale, full = q2, e2, new_scale, new_full
    phases.mark("scale refit + polish")
    info.update({"objective": obj.source, "objective_rtn": e_rtn, "rounding_init": init, "polish_sweeps": sweeps,
                 "objective_init": e_init})
    if init == "gptq":
        info["start"] = info_start
        info["objective_start"] = start[3]
        if start[3] < e:  # never end above the start (the float8 snap, in principle, could)
            q, scale, full, e = start
            info["notes_extra"] = "the learned rounding did not improve on its GPTQ start; kept the start"
        del start
    if not e < e_rtn:
        q, scale, full, e = q_rtn, base_scale, base_full, e_rtn
        info["notes_extra"] = "learned rounding did not improve on round-to-nearest; kept round-to-nearest"
    info["objective_after"] = e
    info["objective_gain_db"] = _gain_db(e_rtn, e)
    info["changed_fraction"] = float((q != spec.cls.grid_values(ws / full)).float().mean())
    info["output_sqnr_db"] = output_sqnr_db(ws, q * full, obj.H_data)
    qw = spec.cls.pack(q if float_grid else q.to(torch.int8), scale, spec.params, ctx.orig_dtype)
    phases.mark("finish")
    if phases.on:
        info["phase_s"] = phases.times
    return OptimizerResult(qw, finish_info(info, obj, t0))


def grid_spacing(t: torch.Tensor) -> torch.Tensor:
    """The float8 E4M3 grid's spacing at ``t`` (in units of the scale): 2^(e - 3) in the binade
    [2^e, 2^(e+1)), 2^-9 below the smallest normal 2^-6. ``floor(t / step) * step`` and the next multiple
    are then the two grid values around ``t`` (both exact E4M3 values)."""
    e = torch.floor(torch.log2(t.abs().clamp(min=2.0 ** -6)))
    return torch.exp2(e - 3)


def _estimate(out: int, inn: int, rotated: bool) -> LayerEstimate:
    # w, floors, h, grad, two Adam moments, scale matrix, hard rounding, D and D·H
    n = out * inn
    return LayerEstimate(weight=40 * n + (4 * n if rotated else 0), sweep=0, hessian=12 * inn * inn, factor=0)


COST = OptimizerCost(_estimate)


@register_optimizer("original", COST)
def learned_rounding_original(w, spec, ctx):
    """Learned rounding with sign descent (the seed's default optimizer name)."""
    return _learned_rounding("original", w, spec, ctx)


@register_optimizer("adamw", COST)
def learned_rounding_adamw(w, spec, ctx):
    """Learned rounding with AdamW."""
    return _learned_rounding("adamw", w, spec, ctx)


@register_optimizer("radam", COST)
def learned_rounding_radam(w, spec, ctx):
    """Learned rounding with RAdam."""
    return _learned_rounding("radam", w, spec, ctx)
