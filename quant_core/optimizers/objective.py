"""What the calibrated optimizers minimize, and the pieces they share.

The layer-output error of a weight error ``D = Ŵ − W`` on inputs ``x`` is ``E‖D x‖² = tr(D H Dᵀ)`` with
``H = E[x xᵀ]`` (the calibration Hessian divided by its token count). Every optimizer works in the
format's *storage space* (where its integers live): for convrot the stored weight is ``W Rᵀ`` and the
activations are rotated the same way, so the objective there uses ``R H Rᵀ``.

Without calibration data there are no activations, and we never invent any: the objective becomes the
SVD-weighted weight error of the seed's idea, written as the same quadratic form with a *proxy* ``H``:
the weight's own top-k right singular directions ``V_k`` with their energy ``σ_k²`` plus the average
energy of the remaining directions on the rest (``k`` from ``--top_p`` of the rank, clamped to
``[--min_k, --max_k]``). It says "inputs lie where the weight listens", errs on the side of plain weight
MSE for the tail, and is flagged "weight-only" in the report.

``--calibration-lora``: ``H ← H + λ·tr(H)/tr(G)·G`` with ``G = ΔᵀΔ`` of the LoRA's weight delta for this
layer (``Δ = s·B·A`` → ``G = s²·Aᵀ(BᵀB)A``, the LoRA's input directions weighted by how much it uses them),
so quantization error is pushed out of the LoRA's subspace. ``λ`` = ``--calibration-lora-weight`` (1.0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence

import torch

from ..checkpoint import checkpoint
from ..errors import CalibrationError
from ..formats import QMAX, FormatSpec
from ..bf16 import rotate_bf16
from ..hadamard import rotate_groups

DEFAULT_CLIP_GRID = (1.0, 0.99, 0.98, 0.96, 0.94, 0.92, 0.9, 0.87, 0.84, 0.8, 0.75, 0.7)


@dataclass
class Objective:
    """``H`` to minimize ``tr(D H Dᵀ)`` with (storage space, mean-normalized), the calibration-only ``H``
    for reporting output SQNR (``None`` without data), and where ``H`` came from."""

    H: torch.Tensor
    H_data: Optional[torch.Tensor]
    source: str  # "calibration" or "weight-only"
    notes: List[str] = field(default_factory=list)


def rotate_hessian(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """``R H Rᵀ`` for the convrot rotation ``R = blockdiag(H_g)`` (``rotate_groups`` applies ``·Rᵀ``)."""
    return rotate_groups(rotate_groups(h, group_size).T.contiguous(), group_size)


def to_storage_hessian(h: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    p = spec.params
    if getattr(p, "convrot", False):
        return rotate_hessian(h, p.convrot_groupsize)
    return h


def svd_proxy_hessian(w: torch.Tensor, top_p: float = 0.2, min_k: int = 64, max_k: int = 1024) -> torch.Tensor:
    """The weight-only proxy ``V_k diag(σ_k²) V_kᵀ + μ (I − V_k V_kᵀ)`` (see the module docstring),
    divided by ``out`` so it is on the scale of ``WᵀW/out``."""
    w = w.float()
    out, inn = w.shape
    rank = min(out, inn)
    k = int(math.ceil(top_p * rank))
    k = max(1, min(rank, max(min_k, min(max_k, k))))
    if k >= rank * 0.5 or rank <= 1024:
        _, s, vh = torch.linalg.svd(w, full_matrices=False)
        s, vh = s[:k], vh[:k]
    else:  # large layer: randomized SVD of the top k only
        _, s, v = torch.svd_lowrank(w, q=min(rank, k + 16), niter=3)
        s, vh = s[:k], v[:, :k].T
    e = s.pow(2)
    tail_energy = max(float(w.pow(2).sum()) - float(e.sum()), 0.0)
    mu = tail_energy / max(inn - k, 1)
    mu = max(mu, 1e-3 * float(e.mean()) if e.numel() else 1e-12)  # keep H positive definite
    h = (vh.T * (e - mu)) @ vh
    h.diagonal().add_(mu)
    return h / out


def lora_gram(delta: torch.Tensor) -> torch.Tensor:
    d = delta.float().reshape(delta.shape[0], -1)
    return d.T @ d


def layer_objective(w: torch.Tensor, spec: FormatSpec, ctx, transform=None) -> Objective:
    """Build the objective for ``w`` in ``spec``'s storage space. ``transform(H) -> H'`` overrides the
    format's own Hessian rotation (QuIP's randomized Hadamard)."""
    oo = ctx.options.objective
    notes: List[str] = []
    rot = transform or (lambda h: to_storage_hessian(h, spec))
    if ctx.decisions.bf16_hessian:  # memory policy: rotate the Hessian in bf16 (quant_core/memory.py)
        rot_f32 = rot
        rot = lambda h: rotate_bf16(h, rot_f32)  # noqa: E731
    stats = ctx.stats
    h_data = None
    if stats is not None:
        if stats.in_features != w.shape[1]:
            raise CalibrationError(f"{ctx.base}: calibration statistics have {stats.in_features} input "
                                   f"channels but the weight has {w.shape[1]}; wrong calibration file?")
        h_data = rot(stats.hessian_mean(device=w.device, dtype=torch.float32))
        h = h_data
        source = "calibration"
    else:
        h = rot(svd_proxy_hessian(w, oo.top_p or 0.2, oo.min_k, oo.max_k).to(w.device))
        source = "weight-only"
        notes.append("weight-only objective (no calibration statistics for this layer)")
    g = getattr(ctx, "lora_delta", None)
    if g is not None:
        gram = rot(lora_gram(g.to(w.device)))
        tg = float(gram.diagonal().sum())
        if tg > 0:
            lam = oo.calibration_lora_weight
            h = h + (lam * float(h.diagonal().sum()) / tg) * gram
            notes.append(f"objective weighted by the LoRA's input directions (λ={lam:g})")
    return Objective(h, h_data, source, notes)


def quad_error(d: torch.Tensor, h: torch.Tensor, chunk: int = 4096) -> float:
    """``tr(D H Dᵀ)`` in float64 accumulation (chunked over rows to bound memory)."""
    total = 0.0
    for i in range(0, d.shape[0], chunk):
        checkpoint()
        di = d[i:i + chunk].float()
        total += float(((di @ h) * di).sum(dtype=torch.float64))
    return total


def output_sqnr_db(w_s: torch.Tensor, w_hat_s: torch.Tensor, h_data: Optional[torch.Tensor]) -> Optional[float]:
    """``10 log10(tr(W H Wᵀ) / tr(D H Dᵀ))`` on the calibration activations (bias excluded)."""
    if h_data is None:
        return None
    err = quad_error(w_hat_s - w_s, h_data)
    sig = quad_error(w_s, h_data)
    if err <= 0 or sig <= 0:
        return None
    return 10.0 * math.log10(sig / err)


def reduce_to_scale(values: torch.Tensor, scale: torch.Tensor, spec: FormatSpec) -> torch.Tensor:
    """Sum ``values`` ([out, in]) over the elements each entry of ``scale`` covers: the adjoint of
    ``expand_scale``, computed by autograd so it holds for every format."""
    if scale.dim() == 2 and tuple(scale.shape) == (values.shape[0], 1) and spec.cls.expand_scale(
            scale[:1], (1, values.shape[1]), spec.params).shape == (1, values.shape[1]) and \
            getattr(spec.params, "scaling", None) == "row":
        return values.sum(dim=1, keepdim=True)  # per-row scale: the common case, without autograd
    if scale.numel() == 1 and getattr(spec.params, "scaling", None) == "tensor":
        return values.sum().reshape(scale.shape)
    s = scale.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        full = spec.cls.expand_scale(s, values.shape, spec.params)
        (g,) = torch.autograd.grad((full * values.detach()).sum(), s)
    return g


def search_scales(ws: torch.Tensor, spec: FormatSpec, col_weight: Optional[torch.Tensor] = None,
                  grid: Sequence[float] = DEFAULT_CLIP_GRID) -> torch.Tensor:
    """Per scale group, the clipping factor of the abs-max scale that minimizes the (column-weighted)
    round-to-nearest error ``Σ_j c_j (w − S·q)²`` -- heavy-tailed weights gain from clipping a little."""
    base = spec.cls.compute_scale(ws, spec.params)
    cw = None if col_weight is None else col_weight.float().reshape(1, -1).to(ws.device)
    best, best_err = base.clone(), None
    for c in grid:
        checkpoint()
        s = base * c
        full = spec.cls.expand_scale(s, ws.shape, spec.params)
        e = (ws - spec.cls.grid_values(ws / full) * full).pow_(2)
        if cw is not None:
            e = e * cw
        err = reduce_to_scale(e, s, spec)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def rtn_integers(ws: torch.Tensor, full_scale: torch.Tensor) -> torch.Tensor:
    return torch.round(ws / full_scale).clamp_(-QMAX, QMAX)


def opt(options, name, default):
    """An option from the CLI/node dict, with ``None`` meaning "use the default"."""
    v = (options or {}).get(name)
    return default if v is None else v


class LoraDirections:
    """``--calibration-lora FILE``: the LoRA's weight delta for each base weight, found with the LoRA key
    mapping of ``quant_core.lora`` (every dialect it understands; fused weights get their row slices)."""

    def __init__(self, path: str, base_infos):
        from ..lora import LoraMerger
        self.path = path
        self.merger = LoraMerger.from_files([path], [1.0])
        self.report = self.merger.bind(base_infos)

    def delta(self, key: str, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """The delta the LoRA would add to ``weight`` (``None`` if it does not touch ``key``)."""
        if not self.merger.has_delta(key):
            return None
        w = weight.detach().to("cpu", torch.float32)
        return self.merger.apply(key, w) - w


def clip_grid(options) -> Sequence[float]:
    """The clipping factors the scale search tries (``scale_search`` false: abs-max scales only)."""
    return DEFAULT_CLIP_GRID if opt(options, "scale_search", True) else (1.0,)  # a Mapping of options


def damped_layer_objective(w: torch.Tensor, spec: FormatSpec, ctx, damp: float):
    """(w as float32, its storage-space weight, the layer objective, the objective's matrix with GPTQ's
    damping added): learned rounding fits the damped matrix -- a ridge toward plain weight error that
    keeps the rounding from fitting the calibration tokens too closely."""
    from .rtn import storage_weight
    w = w.float()
    ws = storage_weight(w, spec, ctx.options)
    obj = layer_objective(w, spec, ctx)
    h_fit = obj.H.clone()
    h_fit.diagonal().add_(damp * float(obj.H.diagonal().mean()))
    return w, ws, obj, h_fit
