"""The learned-rounding algorithm as it was before issue 17 (one host sync and autograd per iteration,
torch optimizers), kept unchanged ONLY for the before/after benchmark (``benchmarks/optimizer_speed.py
--learned-compare``): ``CTQ_LEARNED_ROUNDING=legacy`` routes ``--optimizer original|adamw|radam`` here.
Users get ``learned_rounding.py``.

Learned rounding (``--optimizer original|adamw|radam``): choose, per weight, rounding down or up.

With the scales fixed (clipped abs-max search weighted by ``diag(H)``), every weight may take
``floor(t)`` or ``floor(t) + 1`` of a continuous target ``t`` (in units of its scale). A continuous
``h ∈ [0, 1]`` per weight (start: the fraction of ``t``) is optimized on

    L(h) = tr(D H Dᵀ) / tr(D_rtn H D_rtnᵀ)  +  λ · mean(1 − |2h − 1|^β),    D = S ⊙ (floor(t) + h) − W

(the layer-output error through the calibration Hessian relative to round-to-nearest, or the weight-only
SVD-weighted error without data; see ``objective.py``). The regularizer, off for the first 20% of the
iterations, then pushes ``h`` to 0 or 1 while ``β`` anneals from 20 to 2 (AdaRound, Nagel et al. 2020,
with ``h`` itself as the variable, projected onto [0, 1]; ``λ`` = 10 because our reconstruction term is
normalized to round-to-nearest = 1). Every ``eval_every`` steps the *hard* rounding ``floor(t) + (h ≥ ½)``
is scored on the true objective; the best hard rounding wins, and round-to-nearest is kept if nothing
beats it.

Target ``t`` (``rounding_init``): ``gptq`` (default) -- the error-compensated values of one GPTQ sweep,
so learning starts from the GPTQ solution and refines it; ``nearest`` -- the weight itself, ``W / S``.
On a real MiniLM layer choosing only between floor and ceiling of the *original* weight gains far less
than error feedback does (docs/OPTIMIZERS.md), hence the default.

Optimizers: ``original`` -- sign descent (every weight moves by ``lr`` against its gradient; our
replacement for the seed's custom optimizer); ``adamw`` / ``radam`` -- torch's. Learning-rate schedules
(``--lr_schedule``): ``adaptive`` -- "bold driver": ×(1/lr_gamma) after a step that did not raise the loss
by more than ``lr_threshold`` (relative), ×lr_factor after one that did (then ``lr_cooldown`` steps
without change), capped at 10× the initial rate; ``exponential`` -- ×lr_gamma every step; ``plateau`` --
×lr_factor when the hard objective has not improved by ``lr_threshold`` for ``lr_patience`` evaluations
(then ``lr_cooldown`` evaluations of cooldown). All stay ≥ ``lr_min``. Early stopping:
``--early-stop-loss`` (hard objective relative to round-to-nearest ≤ value), ``--early-stop-lr`` (rate ≤
value), ``--early-stop-stall`` (steps without a better hard rounding).
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch

from ..checkpoint import checkpoint, progress_span
from ..errors import PlanError
from ..formats import QMAX, FormatSpec
from .base import LayerContext, OptimizerResult
from .gptq import DEFAULT_BLOCK, DEFAULT_DAMP, _gain_db, finish_info, gptq_quantize
from .polish import _tf32, best_polished, polish as shared_polish
from .objective import clip_grid, damped_layer_objective, opt, output_sqnr_db, quad_error, rtn_integers, search_scales

SCHEDULES = ("adaptive", "exponential", "plateau")
WARMUP = 0.2
BETA_START, BETA_END = 20.0, 2.0
DEFAULT_REG = 10.0
ROUNDING_INITS = ("gptq", "nearest")
DEFAULT_POLISH = 2


@contextlib.contextmanager
def _fast_matmul(device: torch.device, allow: bool):
    """TF32 for the per-step gradient GEMM on CUDA (the hard objective is always scored in fp32)."""
    with _tf32(device, True) if allow else contextlib.nullcontext():
        yield


class _Schedule:
    def __init__(self, kind: str, lr: float, o: dict):
        if kind not in SCHEDULES:
            raise PlanError(f"unknown --lr_schedule {kind!r} ({', '.join(SCHEDULES)})")
        self.kind, self.lr0, self.lr = kind, lr, lr
        self.gamma = float(opt(o, "lr_gamma", 0.99))
        self.factor = float(opt(o, "lr_factor", 0.5))
        self.patience = int(opt(o, "lr_patience", 10))
        self.cooldown = int(opt(o, "lr_cooldown", 0))
        self.threshold = float(opt(o, "lr_threshold", 0.0))
        self.lr_min = float(opt(o, "lr_min", 1e-8))
        self._last = None
        self._cool = 0
        self._best = None
        self._bad = 0

    def after_step(self, loss: float):
        if self.kind == "exponential":
            self.lr *= self.gamma
        elif self.kind == "adaptive":
            if self._cool > 0:
                self._cool -= 1
            elif self._last is not None and loss > self._last * (1.0 + self.threshold):
                self.lr *= self.factor
                self._cool = self.cooldown
            else:
                self.lr = min(self.lr / self.gamma, 10.0 * self.lr0)
            self._last = loss
        self.lr = max(self.lr, self.lr_min)

    def after_eval(self, hard: float):
        if self.kind != "plateau":
            return
        if self._best is None or hard < self._best * (1.0 - self.threshold):
            self._best, self._bad = hard, 0
            return
        if self._cool > 0:
            self._cool -= 1
            return
        self._bad += 1
        if self._bad > self.patience:
            self.lr = max(self.lr * self.factor, self.lr_min)
            self._bad, self._cool = 0, self.cooldown


def learn_rounding(ws: torch.Tensor, h_obj: torch.Tensor, full_scale: torch.Tensor, method: str, options: dict,
                   e_ref: float, target: Optional[torch.Tensor] = None) -> tuple:
    """Optimize the rounding of ``ws`` (storage space) under ``tr(D H Dᵀ)``; returns
    (best integers, best objective, info). ``target``: the values (in units of the scale) whose floor
    and ceiling are the two choices per weight; default ``ws / full_scale``."""
    o = options or {}
    num_iter = int(opt(o, "num_iter", 1000))
    lr = float(opt(o, "lr", 8.0773e-3))
    eval_every = max(1, int(opt(o, "eval_every", 10)))
    reg = float(opt(o, "round_reg", DEFAULT_REG))
    sched = _Schedule(str(opt(o, "lr_schedule", "adaptive")), lr, o)
    stop_loss = o.get("early_stop_loss")
    stop_lr = o.get("early_stop_lr")
    stop_stall = o.get("early_stop_stall")

    x = ws / full_scale if target is None else target
    base = torch.floor(x)
    frac = x - base
    fixed = (base < -QMAX) | (base > QMAX - 1)  # clipped weights: their integer is ±127, not learned
    base = torch.where(fixed, torch.round(x).clamp(-QMAX, QMAX), base)
    soft = torch.where(fixed, torch.zeros_like(frac), frac).clone().requires_grad_(True)
    free = (~fixed).float()
    n_free = max(float(free.sum()), 1.0)

    if method == "adamw":
        optim = torch.optim.AdamW([soft], lr=lr, weight_decay=0.0)
    elif method == "radam":
        optim = torch.optim.RAdam([soft], lr=lr)
    else:
        optim = None

    def hard_q():
        return base + (soft.detach() >= 0.5).float() * free

    best_q = hard_q()
    best_e = quad_error(best_q * full_scale - ws, h_obj)
    stalled = 0
    stop_reason = "num_iter"
    last_loss = None
    warm = int(WARMUP * num_iter)
    it = 0
    with _fast_matmul(ws.device, bool(opt(o, "allow_tf32", True))):
        for it in range(1, num_iter + 1):
            checkpoint((it - 1) / num_iter)  # cancel / progress (rate-limited)
            d = (base + soft.detach() * free) * full_scale - ws
            g = d @ h_obj
            rec = float((d * g).sum(dtype=torch.float64)) / e_ref
            grad_h = (2.0 / e_ref) * g * full_scale * free
            if it > warm:
                t = (it - warm) / max(num_iter - warm, 1)
                beta = BETA_START + (BETA_END - BETA_START) * t
                with torch.enable_grad():
                    r = (1.0 - (2.0 * soft - 1.0).abs().pow(beta)) * free
                    reg_loss = reg * r.sum() / n_free
                    (reg_grad,) = torch.autograd.grad(reg_loss, soft)
                grad_h = grad_h + reg_grad
                loss = rec + float(reg_loss.detach())
            else:
                loss = rec
            for pg in (optim.param_groups if optim is not None else ()):
                pg["lr"] = sched.lr
            if optim is None:  # "original": sign descent, every weight moves by lr against its gradient
                with torch.no_grad():
                    soft.sub_(sched.lr * torch.sign(grad_h))
            else:
                soft.grad = grad_h
                optim.step()
            with torch.no_grad():
                soft.clamp_(0.0, 1.0)
            sched.after_step(loss)
            last_loss = loss
            if it % eval_every == 0 or it == num_iter:
                q = hard_q()
                e = quad_error(q * full_scale - ws, h_obj)
                if e < best_e:
                    best_q, best_e = q, e
                    stalled = 0
                else:
                    stalled += eval_every
                sched.after_eval(e)
                if stop_loss is not None and best_e / e_ref <= float(stop_loss):
                    stop_reason = "early_stop_loss"
                    break
                if stop_stall is not None and stalled >= int(stop_stall):
                    stop_reason = "early_stop_stall"
                    break
            if stop_lr is not None and sched.lr <= float(stop_lr):
                stop_reason = "early_stop_lr"
                break
    return best_q, best_e, {"iterations": it, "stop": stop_reason, "final_lr": sched.lr,
                            "final_loss": last_loss, "method": method, "schedule": sched.kind,
                            "last_q": hard_q()}


def polish(q, ws, full_scale, h, sweeps, block: int = 128):
    """The coordinate-descent polish (``polish.polish``), eager as before issue 17 (no CUDA graphs)."""
    return shared_polish(q, ws, full_scale, h, sweeps, block, cuda_graphs=False)


def _learned_rounding(method: str, w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    t0 = time.perf_counter()
    w, ws, obj, h_fit = damped_layer_objective(w, spec, ctx, float(opt(ctx.options, "gptq_damp", DEFAULT_DAMP)))
    base_scale = spec.cls.compute_scale(ws, spec.params)
    base_full = spec.cls.expand_scale(base_scale, ws.shape, spec.params)
    q_rtn = rtn_integers(ws, base_full)
    e_rtn = quad_error(q_rtn * base_full - ws, h_fit)

    scale = search_scales(ws, spec, obj.H.diagonal().clamp(min=0), clip_grid(ctx.options))
    full = spec.cls.expand_scale(scale, ws.shape, spec.params)
    e_ref = max(e_rtn, 1e-30)
    init = str(opt(ctx.options, "rounding_init", "gptq"))
    if init not in ROUNDING_INITS:
        raise PlanError(f"unknown rounding init {init!r} ({', '.join(ROUNDING_INITS)})")
    target, e_init = None, None
    if init == "gptq":
        # one error-feedback sweep gives the continuous starting point: floor/ceil of the *original*
        # weight cannot compensate errors across correlated channels (docs/OPTIMIZERS.md measures it)
        o = ctx.options or {}
        with progress_span(0.0, 0.2):
            q0, ginfo = gptq_quantize(ws, obj.H, full, int(opt(o, "gptq_block_size", DEFAULT_BLOCK)),
                                      bool(opt(o, "gptq_actorder", False)),
                                      float(opt(o, "gptq_damp", DEFAULT_DAMP)), int(opt(o, "row_segments", 1)),
                                      factor_device=opt(o, "hessian_device", None), return_target=True)
        target = ginfo["target"]
        e_init = quad_error(q0 * full - ws, h_fit)
        del q0
    # normalize by the starting point's error: the regularizer weight is relative to what is left to gain
    with progress_span(0.2 if init == "gptq" else 0.0, 0.95):
        q, e, info = learn_rounding(ws, h_fit, full, method, ctx.options, max(e_init, 1e-30) if e_init else e_ref,
                                    target)
    del target
    last_q = info.pop("last_q")
    sweeps = int(opt(ctx.options, "polish_sweeps", DEFAULT_POLISH))
    if sweeps > 0:
        # polish both the best rounding seen and where the learning ended (binarized by the
        # regularizer): they are different local optima, either may win
        info["objective_learned"] = e
        starts = [q] + ([last_q] if not torch.equal(last_q, q) else [])
        q, e, k = best_polished(starts, ws, full, h_fit, sweeps, quad_error)
        info["polished"] = ["best rounding seen", "final learned rounding"][k]
    del last_q
    info.update({"objective": obj.source, "objective_rtn": e_rtn, "rounding_init": init, "polish_sweeps": sweeps})
    if e_init is not None:
        info["objective_init"] = e_init
    if not e < e_rtn:
        q, scale, full, e = q_rtn, base_scale, base_full, e_rtn
        info["notes_extra"] = "learned rounding did not improve on round-to-nearest; kept round-to-nearest"
    info["objective_after"] = e
    info["objective_gain_db"] = _gain_db(e_rtn, e)
    info["changed_fraction"] = float((q != rtn_integers(ws, full)).float().mean())
    info["output_sqnr_db"] = output_sqnr_db(ws, q * full, obj.H_data)
    qw = spec.cls.pack(q.to(torch.int8), scale, spec.params, ctx.orig_dtype)
    return OptimizerResult(qw, finish_info(info, obj, t0))


def legacy_learned_rounding(method: str, w, spec, ctx) -> OptimizerResult:
    return _learned_rounding(method, w, spec, ctx)
