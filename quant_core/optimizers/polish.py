"""Coordinate-descent polish of a hard rounding (learned rounding's last phase, also run by the
pre-issue-17 learner the benchmarks compare against): each weight in turn takes the integer that
minimizes ``tr(D H Dᵀ)`` with the others fixed; on CUDA each block's column sweep is replayed from a
CUDA graph like GPTQ's."""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Optional

import torch

from ..checkpoint import checkpoint
from ..formats import QMAX
from .gptq import CUDA_GRAPHS, cached_graph


@contextlib.contextmanager
def _tf32(device: torch.device, allow: bool):
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


# ------------------------------------------------------------------------------------------------
# polish: coordinate descent on the hard rounding (column sweep replayed from a CUDA graph on CUDA)
# ------------------------------------------------------------------------------------------------
def _polish_block(qt, gt_blk, st, hd, hb, upd, changed):
    """Columns ``j0..j1`` of one sweep: ``qt``/``st``/``hd`` are the block's rows of the transposed
    integers / scales / diag(H); ``gt_blk`` the block's gradient rows (updated rank-1 in place);
    ``hb`` the block's [cols, cols] part of H; ``upd`` receives the scaled changes."""
    for j in range(qt.shape[0]):
        new = (qt[j] - torch.round(gt_blk[j] / (st[j] * hd[j]))).clamp_(-QMAX, QMAX)
        dq = new - qt[j]
        changed += torch.count_nonzero(dq)
        qt[j] = new
        d = upd[j]
        torch.mul(dq, st[j], out=d)
        gt_blk.addr_(hb[j], d)


class _PolishGraph:
    def __init__(self, device, cols, rows):
        f = dict(device=device, dtype=torch.float32)
        self.q, self.g, self.s = torch.zeros(cols, rows, **f), torch.zeros(cols, rows, **f), torch.ones(cols, rows, **f)
        self.hd, self.hb = torch.ones(cols, **f), torch.eye(cols, **f)
        self.upd = torch.zeros(cols, rows, **f)
        self.changed = torch.zeros((), dtype=torch.int64, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            _polish_block(self.q.clone(), self.g.clone(), self.s, self.hd, self.hb, self.upd.clone(),
                          self.changed.clone())
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            _polish_block(self.q, self.g, self.s, self.hd, self.hb, self.upd, self.changed)
        self.nbytes = 4 * cols * rows * 4

    def __call__(self, qt, gt_blk, st, hd, hb, upd, changed):
        self.q.copy_(qt)
        self.g.copy_(gt_blk)
        self.s.copy_(st)
        self.hd.copy_(hd)
        self.hb.copy_(hb)
        self.changed.zero_()
        self.graph.replay()
        qt.copy_(self.q)
        gt_blk.copy_(self.g)
        upd.copy_(self.upd)
        changed += self.changed


_graphs: "collections.OrderedDict[tuple, Optional[_PolishGraph]]" = collections.OrderedDict()
_graphs_lock = threading.Lock()


def _polish_graph(device, cols, rows):
    return cached_graph(_graphs, _graphs_lock, (str(device), cols, rows, threading.get_ident()),
                        lambda: _PolishGraph(device, cols, rows))


def clear_graphs() -> None:
    with _graphs_lock:
        _graphs.clear()


def polish(q: torch.Tensor, ws: torch.Tensor, full_scale: torch.Tensor, h: torch.Tensor, sweeps: int,
           block: int = 128, cuda_graphs: Optional[bool] = None) -> torch.Tensor:
    """Coordinate descent on the hard rounding: each weight in turn takes the integer that minimizes
    ``tr(D H Dᵀ)`` with all others fixed (all rows at once, one input column at a time). Never raises the
    objective; a sweep costs about one GPTQ pass. Like GPTQ it works on transposed (column-contiguous)
    copies and updates the gradient lazily: rank-1 inside a block of columns, one GEMM per block; on
    CUDA each block's column loop is replayed from a CUDA graph (same kernels, same integers)."""
    n = ws.shape[1]
    use_graph = (CUDA_GRAPHS if cuda_graphs is None else cuda_graphs) and ws.device.type == "cuda"
    qt = q.T.contiguous()
    st = full_scale.expand_as(ws).T.contiguous()
    with _tf32(ws.device, False):
        gt = ((q * full_scale - ws) @ h).T.contiguous()  # [n, out]: gradient / 2 of every row's error
    hd = h.diagonal().clamp(min=1e-30).contiguous()
    for _ in range(sweeps):
        # no host sync inside the sweep (a zero change adds exact zeros): one check per sweep
        changed = torch.zeros((), dtype=torch.int64, device=qt.device)
        for j0 in range(0, n, block):
            checkpoint()
            j1 = min(j0 + block, n)
            upd = torch.empty(j1 - j0, qt.shape[1], device=qt.device, dtype=qt.dtype)
            fn = _polish_graph(qt.device, j1 - j0, qt.shape[1]) if use_graph else None
            (fn or _polish_block)(qt[j0:j1], gt[j0:j1], st[j0:j1], hd[j0:j1], h[j0:j1, j0:j1].contiguous(),
                                  upd, changed)
            with _tf32(ws.device, False):
                if j0 > 0:
                    gt[:j0].addmm_(h[j0:j1, :j0].T, upd)
                if j1 < n:
                    gt[j1:].addmm_(h[j0:j1, j1:].T, upd)
        if not int(changed):
            break
    return qt.T.contiguous()


def best_polished(starts, ws: torch.Tensor, full_scale: torch.Tensor, h: torch.Tensor, sweeps: int, quad_error):
    """Polish each starting rounding (the best seen, the final one) and keep the lowest objective:
    (integers, objective, which start won: 0 or 1)."""
    candidates = [polish(q, ws, full_scale, h, sweeps) for q in starts]
    errs = [quad_error(c * full_scale - ws, h) for c in candidates]
    j = min(range(len(errs)), key=errs.__getitem__)
    return candidates[j], errs[j], j
