"""GPTQ (``--optimizer gptq``): column-by-column rounding with error feedback through the Hessian.

Quantizes the weight one input column at a time; the rounding error of a column is spread over the
columns not yet quantized along ``H⁻¹`` so the layer output ``X Wᵀ`` moves as little as possible
(Frantar et al., 2022). This implementation:

* works in the format's storage space with the storage-space Hessian, and uses the format's own scale
  layout (per-row, per-tensor, 128×128 tiles: scales are fixed before the sweep, chosen by a clipped
  abs-max search weighted by ``diag(H)``), so the result is exactly the planned format;
* is *blocked with lazy batch updates*: within a block of ``block_size`` columns the updates are rank-1,
  the rest of the matrix is updated once per block with one GEMM;
* factors ``H + λ·mean(diag H)·I`` by Cholesky in float64 (``λ`` = 3% by default, ``--gptq-damp``; ×10
  until the factorization succeeds) and uses the upper Cholesky factor of ``H⁻¹``;
* with ``--gptq-actorder`` visits columns by decreasing ``diag(H)`` (scales stay tied to their column);
* never calls ``quantile`` or anything else limited to 16.7M elements, and can process the output rows
  in segments (rows are independent given ``H``) to bound working memory on very large layers.

The same routine is LDLQ, which QuIP runs in its incoherent (Hadamard-rotated) space (``quip.py``).
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Optional, Tuple

import torch

from ..checkpoint import cancellable, checkpoint, interruptible
from ..errors import CalibrationError
from ..formats import QMAX, FormatSpec
from .base import LayerContext, LayerEstimate, OptimizerCost, OptimizerResult, register_optimizer
from .rtn import storage_weight
from .objective import clip_grid, layer_objective, output_sqnr_db, quad_error, search_scales

DEFAULT_BLOCK = 128
DEFAULT_DAMP = 0.03  # chosen on MiniLM held-out sentences from {1%, 3%, 10%, 30%} (docs/OPTIMIZERS.md)


class IndefiniteHessianError(CalibrationError):
    """GPTQ/QuIP could not factor ``H + λ·I`` for any damping tried (statistics that are not XᵀX)."""


# below this width a CPU factorization takes well under the 2 s a Cancel may take; above it, it runs
# through ``checkpoint.interruptible``
INTERRUPTIBLE_MIN_WIDTH = 1024


def inverse_cholesky(h: torch.Tensor, damp: float = DEFAULT_DAMP, max_tries: int = 6
                     ) -> Tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λ·mean(diag H)·I)⁻¹`` (float32) and the ``λ`` used.

    Float64 throughout, holding at most two ``in × in`` float64 matrices at a time (~16·in² bytes, plus
    the float32 result): at DiT widths (in = 15360: 1.9 GB per matrix) this factorization is the largest
    working set of GPTQ/QuIP, so every temporary is released as soon as the next one exists. On the CPU,
    wide factorizations can be cancelled while LAPACK runs (``checkpoint.interruptible``)."""
    if h.device.type == "cpu" and h.shape[0] >= INTERRUPTIBLE_MIN_WIDTH and cancellable():
        return interruptible(_inverse_cholesky, h, damp, max_tries)
    return _inverse_cholesky(h, damp, max_tries)


def _inverse_cholesky(h: torch.Tensor, damp: float, max_tries: int) -> Tuple[torch.Tensor, float]:
    n = h.shape[0]
    mean_diag = float(h.diagonal().to(torch.float64).mean())
    if not mean_diag > 0:
        mean_diag = 1.0
    lam = damp
    for _ in range(max_tries):
        hd = h.to(torch.float64, copy=True)
        hd.diagonal().add_(lam * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            if chol.device.type == "cpu":  # much faster than cholesky_inverse on the CPU
                hinv = torch.cholesky_solve(torch.eye(n, dtype=torch.float64), chol)
            else:
                hinv = torch.cholesky_inverse(chol)
            del chol
            sym = hinv + hinv.T
            del hinv
            sym.mul_(0.5)
            u, info2 = torch.linalg.cholesky_ex(sym, upper=True)
            del sym
            if int(info2) == 0:
                return u.to(torch.float32), lam
            del u
        else:
            del chol
        lam *= 10.0
    raise IndefiniteHessianError(
        f"its Hessian is not positive definite even with damping {lam / 10:g}·mean(diag H) "
        f"({max_tries} tries from {damp:g}, x10 each): it has large negative eigenvalues, so it is not a "
        "sum of x·xᵀ over real activations")



def _sweep_block(w1: torch.Tensor, s1: torch.Tensor, u1: torch.Tensor, q1: torch.Tensor,
                 x1: Optional[torch.Tensor], err1: torch.Tensor, grid=None) -> None:
    """One block of the sweep, column by column (rows of the transposed weight ``w1`` [cols, rows],
    updated in place): round with the scales ``s1``, write the integers to ``q1`` (and the values
    before rounding to ``x1``), and push each column's scaled error onto the later columns of the
    block along ``u1`` (the block's part of the upper Cholesky factor of ``H⁻¹``). ``grid``: the
    format's nearest-grid-value function (``QuantFormat.grid_round``; None: int8 integers)."""
    cols = w1.shape[0]
    for i in range(cols):
        row = w1[i]
        sc = s1[i]
        xr = row / sc
        qr = torch.round(xr).clamp_(-QMAX, QMAX) if grid is None else grid(xr)
        q1[i] = qr
        if x1 is not None:
            x1[i] = xr
        e = (row - qr * sc) / u1[i, i]
        if i + 1 < cols:
            w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1.0)
        err1[i] = e


class _SweepGraph:
    """``_sweep_block`` captured once per (device, columns, rows, with targets) into a CUDA graph on
    static buffers; calling it copies a block in, replays, and copies the results out."""

    def __init__(self, device: torch.device, cols: int, rows: int, target: bool, grid=None):
        f = dict(device=device, dtype=torch.float32)
        self.w, self.s, self.u = torch.zeros(cols, rows, **f), torch.ones(cols, rows, **f), torch.eye(cols, **f)
        self.q, self.e = torch.empty(cols, rows, **f), torch.empty(cols, rows, **f)
        self.x = torch.empty(cols, rows, **f) if target else None
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture (lazy initialisations)
            _sweep_block(self.w.clone(), self.s, self.u, self.q, self.x, self.e, grid)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the read-ahead thread may allocate page-locked memory meanwhile
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            _sweep_block(self.w, self.s, self.u, self.q, self.x, self.e, grid)
        self.nbytes = (5 + target) * cols * rows * 4

    def __call__(self, w1, s1, u1, q1, x1, err1) -> None:
        self.w.copy_(w1)
        self.s.copy_(s1)
        self.u.copy_(u1)
        self.graph.replay()
        q1.copy_(self.q)
        err1.copy_(self.e)
        if x1 is not None:
            x1.copy_(self.x)


# the sweep of a block is ~10 kernel launches per column from Python: launch-bound on a GPU (replayed
# from a graph: 3.5-7.9x faster per Flux layer on an H200, benchmarks/gptq_sweep.py). ``CTQ_CUDA_GRAPHS=0``: eager.
CUDA_GRAPHS = os.environ.get("CTQ_CUDA_GRAPHS", "1") != "0"
GRAPH_CACHE_BYTES = 256 << 20  # static buffers of the graphs kept (one per block shape), least recently used out
_graphs: "collections.OrderedDict[tuple, Optional[_SweepGraph]]" = collections.OrderedDict()
_graphs_lock = threading.Lock()


def _graph_for(device: torch.device, cols: int, rows: int, target: bool, grid=None) -> Optional[_SweepGraph]:
    """The cached graph for this block shape, captured on first use; ``None`` (use the eager loop)
    where capturing failed, e.g. out of memory."""
    # per thread: the static buffers must not be shared by two conversions running at once
    key = (str(device), cols, rows, target, threading.get_ident(), grid)
    return cached_graph(_graphs, _graphs_lock, key, lambda: _SweepGraph(device, cols, rows, target, grid))


def cached_graph(cache: "collections.OrderedDict", lock: threading.Lock, key: tuple, capture):
    """``cache[key]``, captured by ``capture()`` on a miss (None where capturing failed -- memory, driver:
    the eager loop computes the same); least recently used graphs are dropped beyond GRAPH_CACHE_BYTES."""
    with lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        try:
            g = capture()
        except Exception:
            g = None
        cache[key] = g
        while len(cache) > 1 and sum(v.nbytes for v in cache.values() if v is not None) > GRAPH_CACHE_BYTES:
            cache.popitem(last=False)
        return g


def clear_graphs() -> None:
    """Release the captured sweeps and their memory (the memory policy calls it before retrying a layer)."""
    with _graphs_lock:
        _graphs.clear()


def gptq_quantize(ws: torch.Tensor, h: torch.Tensor, full_scale: torch.Tensor, block_size: int = DEFAULT_BLOCK,
                  actorder: bool = False, damp: float = DEFAULT_DAMP, row_segments: int = 1,
                  factor_device=None, return_target: bool = False, cuda_graphs: Optional[bool] = None,
                  grid=None) -> Tuple[torch.Tensor, dict]:
    """Integers (float tensor of values in [-127, 127]) for the storage-space weight ``ws`` [out, in]
    with per-element scales ``full_scale``, minimizing ``tr(D H Dᵀ)`` greedily (GPTQ/LDLQ).
    ``return_target``: also return (in ``info["target"]``) the error-compensated values each weight
    had when it was rounded, in units of its scale (learned rounding starts from them).

    Works on the transposed weight (one input column = one contiguous row), which makes the rank-1
    updates inside a block several times faster than on column slices. On a GPU each block's column
    sweep is replayed from a CUDA graph (``cuda_graphs``, default ``CUDA_GRAPHS``): the same kernels
    on the same values, so the integers are bit-identical to the eager loop, without ~10 launches
    from Python per column. ``grid``: the format's ``grid_round`` (None: int8 integers in ±127)."""
    out, n = ws.shape
    if cuda_graphs is None:
        cuda_graphs = CUDA_GRAPHS
    cuda_graphs = bool(cuda_graphs) and ws.device.type == "cuda"
    h = h.to(ws.device, torch.float32).clone()
    dead = h.diagonal() <= 0
    if bool(dead.any()):
        # channels that never saw an input: any value is exact; keep them at round-to-nearest and do not
        # let them absorb error from other columns
        h[dead, :] = 0
        h[:, dead] = 0
        h.diagonal()[dead] = 1.0
    perm = None
    if actorder:
        perm = torch.argsort(h.diagonal(), descending=True)
        h = h[perm][:, perm]
    # the float64 factorization needs ~20·in² bytes: the memory policy may put it on the CPU
    u, lam = inverse_cholesky(h if factor_device is None else h.to(factor_device), damp)
    u = u.to(ws.device)
    del h
    q_all = torch.empty(out, n, device=ws.device, dtype=torch.float32)
    x_all = torch.empty(out, n, device=ws.device, dtype=torch.float32) if return_target else None
    n_seg = max(int(row_segments), 1)
    seg = (out + n_seg - 1) // n_seg
    for r0 in range(0, out, seg):
        r1 = min(out, r0 + seg)
        wt = ws[r0:r1].to(torch.float32, copy=True).T  # [n, rows]; a copy: never modify the caller's weight
        st = full_scale[r0:r1].to(ws.device, torch.float32).expand(r1 - r0, n).T
        if perm is not None:
            wt, st = wt[perm], st[perm]
        wt, st = wt.contiguous(), st.contiguous()
        qt = torch.empty_like(wt)
        xt = torch.empty_like(wt) if return_target else None
        for i1 in range(0, n, block_size):
            checkpoint((r0 * n + (r1 - r0) * i1) / (out * n))  # cancel / progress (rate-limited)
            i2 = min(i1 + block_size, n)
            err1 = torch.empty_like(wt[i1:i2])
            sweep = _graph_for(wt.device, i2 - i1, r1 - r0, xt is not None, grid) if cuda_graphs else None
            if sweep is not None:
                sweep(wt[i1:i2], st[i1:i2], u[i1:i2, i1:i2], qt[i1:i2], None if xt is None else xt[i1:i2], err1)
            else:
                _sweep_block(wt[i1:i2], st[i1:i2], u[i1:i2, i1:i2], qt[i1:i2], None if xt is None else xt[i1:i2],
                             err1, grid)
            if i2 < n:
                wt[i2:].addmm_(u[i1:i2, i2:].T, err1, alpha=-1.0)
        if perm is not None:
            inv = torch.argsort(perm)
            qt = qt[inv]
            xt = xt[inv] if xt is not None else None
        q_all[r0:r1] = qt.T
        if xt is not None:
            x_all[r0:r1] = xt.T
        del wt, st, qt, xt
    info = {"damp": lam, "actorder": actorder, "block_size": block_size, "row_segments": (out + seg - 1) // seg}
    if factor_device is not None:
        info["hessian_factored_on"] = str(factor_device)
    if return_target:
        info["target"] = x_all
    return q_all, info


def quantize_with_objective(w: torch.Tensor, spec: FormatSpec, ctx: LayerContext, ws: torch.Tensor, obj,
                            actorder: bool, row_segments: int = 1, label: str = "gptq", factor_device=None):
    """GPTQ/LDLQ of storage-space ``ws`` under ``obj``; returns (integers, scale, info). Keeps the
    round-to-nearest result if GPTQ does not lower the objective (it practically always does)."""
    g = ctx.options.gptq
    scale = search_scales(ws, spec, obj.H.diagonal().clamp(min=0), clip_grid(ctx.options))
    full = spec.cls.expand_scale(scale, ws.shape, spec.params)
    block, damp = g.gptq_block_size, g.gptq_damp
    # the memory policy (quant_core.memory.place_layer) may ask for more row segments / a CPU factorization
    row_segments = max(int(row_segments), ctx.decisions.row_segments)
    factor_device = factor_device or ctx.decisions.hessian_device
    # placements that save memory (row segments, factorization on the CPU) keep no captured sweeps
    constrained = row_segments > 1 or factor_device is not None
    if constrained:  # and hold none from earlier layers: this layer's estimate does not count them
        clear_graphs()
    q, info = gptq_quantize(ws, obj.H, full, block, actorder, damp, row_segments, factor_device=factor_device,
                            cuda_graphs=False if constrained else None, grid=spec.cls.grid_round)
    base_scale = spec.cls.compute_scale(ws, spec.params)
    base_full = spec.cls.expand_scale(base_scale, ws.shape, spec.params)
    q_rtn = spec.cls.grid_values(ws / base_full)
    e_rtn = quad_error(q_rtn * base_full - ws, obj.H)
    e_opt = quad_error(q * full - ws, obj.H)
    info.update({"objective": obj.source, "objective_rtn": e_rtn, "objective_after": e_opt})
    if not e_opt < e_rtn:
        info["notes_extra"] = f"{label} did not improve on round-to-nearest; kept round-to-nearest"
        q, scale, full, e_opt = q_rtn, base_scale, base_full, e_rtn
        info["objective_after"] = e_rtn
    info["objective_gain_db"] = _gain_db(e_rtn, info["objective_after"])
    info["output_sqnr_db"] = output_sqnr_db(ws, q * full, obj.H_data)
    return q, scale, info


def _gain_db(before: float, after: float) -> Optional[float]:
    import math
    if after <= 0 or before <= 0:
        return None
    return 10.0 * math.log10(before / after)


def finish_info(info: dict, obj, t0: float) -> dict:
    notes = list(obj.notes)
    if "notes_extra" in info:
        notes.append(info.pop("notes_extra"))
    info["notes"] = notes
    info["seconds"] = time.perf_counter() - t0
    return info


# a calibrated layer's time is mostly its column sweep (one step per input column, ~launch-bound on a
# GPU) plus work on the whole matrix; round-to-nearest is bound by bytes
SWEEP_STEP_COST = 8192


def sweep_estimate(out: int, inn: int, rotated: bool) -> LayerEstimate:
    """GPTQ/LDLQ working set: w, ws, q_all, scale search (2 full temporaries), q_rtn; sweep: wt, st, qt
    per segment, and on a GPU the captured block sweep's static buffers (6 x 128 columns,
    ``GRAPH_CACHE_BYTES``); the Hessian, its copies and the float64 factorization."""
    n = out * inn
    rot = 4 * n if rotated else 0
    return LayerEstimate(weight=24 * n + rot + 3072 * out, sweep=12 * n,
                         hessian=12 * inn * inn + (4 * inn * inn if rotated else 0), factor=20 * inn * inn)


SWEEP_COST = OptimizerCost(
    sweep_estimate, row_sweep=True,
    time=lambda out, inn: float(inn) * (out + SWEEP_STEP_COST) + float(inn) ** 3 / 4096.0,
    release=clear_graphs)


@register_optimizer("gptq", SWEEP_COST)
def gptq(w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    """GPTQ in the planned format (see the module docstring)."""
    t0 = time.perf_counter()
    w = w.float()
    ws = storage_weight(w, spec, ctx.decisions)
    obj = layer_objective(w, spec, ctx)
    q, scale, info = quantize_with_objective(w, spec, ctx, ws, obj, ctx.options.gptq.gptq_actorder)
    qw = spec.cls.pack(q, scale, spec.params, ctx.orig_dtype)
    return OptimizerResult(qw, finish_info(info, obj, t0))
