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

import time
from typing import Optional, Tuple

import torch

from ..formats import QMAX, FormatSpec
from . import LayerContext, OptimizerResult, register_optimizer
from ..memory import storage_weight
from .objective import clip_grid, layer_objective, opt, output_sqnr_db, quad_error, rtn_integers, search_scales

DEFAULT_BLOCK = 128
DEFAULT_DAMP = 0.03  # chosen on MiniLM held-out sentences from {1%, 3%, 10%, 30%} (docs/OPTIMIZERS.md)


def inverse_cholesky(h: torch.Tensor, damp: float = DEFAULT_DAMP, max_tries: int = 6
                     ) -> Tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λ·mean(diag H)·I)⁻¹`` (float32) and the ``λ`` used.

    Float64 throughout, holding at most two ``in × in`` float64 matrices at a time (~16·in² bytes, plus
    the float32 result): at DiT widths (in = 15360: 1.9 GB per matrix) this factorization is the largest
    working set of GPTQ/QuIP, so every temporary is released as soon as the next one exists."""
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
    raise RuntimeError(f"GPTQ: Hessian is not positive definite even with damping {lam / 10:g}")


def gptq_quantize(ws: torch.Tensor, h: torch.Tensor, full_scale: torch.Tensor, block_size: int = DEFAULT_BLOCK,
                  actorder: bool = False, damp: float = DEFAULT_DAMP, row_segments: int = 1,
                  factor_device=None, return_target: bool = False) -> Tuple[torch.Tensor, dict]:
    """Integers (float tensor of values in [-127, 127]) for the storage-space weight ``ws`` [out, in]
    with per-element scales ``full_scale``, minimizing ``tr(D H Dᵀ)`` greedily (GPTQ/LDLQ).
    ``return_target``: also return (in ``info["target"]``) the error-compensated values each weight
    had when it was rounded, in units of its scale (learned rounding starts from them).

    Works on the transposed weight (one input column = one contiguous row), which makes the rank-1
    updates inside a block several times faster than on column slices."""
    out, n = ws.shape
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
            i2 = min(i1 + block_size, n)
            w1 = wt[i1:i2]  # a view: updated in place
            err1 = torch.empty_like(w1)
            u1 = u[i1:i2, i1:i2]
            for i in range(i2 - i1):
                row = w1[i]
                sc = st[i1 + i]
                xr = row / sc
                qr = torch.round(xr).clamp_(-QMAX, QMAX)
                qt[i1 + i] = qr
                if xt is not None:
                    xt[i1 + i] = xr
                e = (row - qr * sc) / u1[i, i]
                if i + 1 < i2 - i1:
                    w1[i + 1:].addr_(u1[i, i + 1:], e, alpha=-1.0)
                err1[i] = e
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
    opts = ctx.options or {}
    scale = search_scales(ws, spec, obj.H.diagonal().clamp(min=0), clip_grid(ctx.options))
    full = spec.cls.expand_scale(scale, ws.shape, spec.params)
    block = int(opt(opts, "gptq_block_size", DEFAULT_BLOCK))
    damp = float(opt(opts, "gptq_damp", DEFAULT_DAMP))
    # the memory policy (quant_core.memory.place_layer) may ask for more row segments / a CPU factorization
    row_segments = max(int(row_segments), int(opt(opts, "row_segments", 1)))
    q, info = gptq_quantize(ws, obj.H, full, block, actorder, damp, row_segments,
                            factor_device=factor_device or opt(opts, "hessian_device", None))
    base_scale = spec.cls.compute_scale(ws, spec.params)
    base_full = spec.cls.expand_scale(base_scale, ws.shape, spec.params)
    q_rtn = rtn_integers(ws, base_full)
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


@register_optimizer("gptq")
def gptq(w: torch.Tensor, spec: FormatSpec, ctx: LayerContext) -> OptimizerResult:
    """GPTQ in the planned format (see the module docstring)."""
    t0 = time.perf_counter()
    w = w.float()
    ws = storage_weight(w, spec, ctx.options)
    obj = layer_objective(w, spec, ctx)
    q, scale, info = quantize_with_objective(w, spec, ctx, ws, obj, bool(opt(ctx.options, "gptq_actorder", False)))
    qw = spec.cls.pack(q.to(torch.int8), scale, spec.params, ctx.orig_dtype)
    return OptimizerResult(qw, finish_info(info, obj, t0))
