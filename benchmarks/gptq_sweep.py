"""GPTQ/LDLQ column sweep: the eager loop vs the same loop replayed from CUDA graphs, per Flux layer shape.

    python benchmarks/gptq_sweep.py             # GPU: every distinct Flux-dev linear shape
    python benchmarks/gptq_sweep.py --small     # dimensions / 8 (a quick check of the script itself)

For each shape (out x in) a Student-t(5) x 0.02 weight and a Hessian of generated activations (outlier
channels) go through ``gptq_quantize`` -- the routine GPTQ, QuIP's LDLQ and learned rounding's start
share -- once with ``cuda_graphs=False`` and once with ``cuda_graphs=True`` (graphs captured by an
untimed first call of that shape, whose time -- capture plus one sweep -- is printed too). Prints seconds per layer, the
ratio eager / graph, and whether the integers are bit-identical (they must be: the graph replays the
same kernels on the same values). Also prints the projected sweep time for Flux-dev's 304 block layers.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from convert_to_quant.quant_core.optimizers import gptq as G

FLUX_SHAPES = {  # (out, in): number of such layers in Flux-dev's double + single blocks
    (18432, 3072): 38, (9216, 3072): 76, (3072, 3072): 38, (12288, 3072): 38, (3072, 12288): 38,
    (21504, 3072): 38, (3072, 15360): 38,
}


def problem(out: int, inn: int, device: torch.device, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    w = (torch.distributions.StudentT(5.0).sample((out, inn)) * 0.02).to(device)
    x = torch.randn(2048, inn, generator=g) * (1 + 8 * (torch.rand(inn, generator=g) > 0.99))
    x = x.to(device)
    h = x.T @ x / x.shape[0]
    full = (w.abs().amax(1, keepdim=True) / 127).expand(out, inn)
    return w, h, full


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return r, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="every dimension / 8")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per shape and mode (median)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: CUDA graphs need one (the CPU always runs the eager loop)")
        return 0
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    div = 8 if a.small else 1
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'shape (out x in)':>18} {'eager s':>8} {'graph s':>8} {'ratio':>6} {'1st call s':>10}  identical")
    tot_e = tot_g = 0.0
    all_same = True
    for (out, inn), count in FLUX_SHAPES.items():
        out, inn = out // div, inn // div
        w, h, full = problem(out, inn, dev, out + inn)
        G.clear_graphs()
        _, cap = timed(lambda: G.gptq_quantize(w, h, full, cuda_graphs=True))  # captures this shape's graphs
        G.gptq_quantize(w, h, full, cuda_graphs=False)  # warm the eager path too
        te, tg = [], []
        for _ in range(max(a.repeats, 1)):
            (qe, _), t = timed(lambda: G.gptq_quantize(w, h, full, cuda_graphs=False))
            te.append(t)
            (qg, _), t = timed(lambda: G.gptq_quantize(w, h, full, cuda_graphs=True))
            tg.append(t)
        e, g = sorted(te)[len(te) // 2], sorted(tg)[len(tg) // 2]
        same = torch.equal(qe, qg)
        all_same &= same
        tot_e += e * count
        tot_g += g * count
        print(f"{out:>8} x {inn:<7} {e:8.3f} {g:8.3f} {e / g:6.2f} {cap:10.3f}  {'yes' if same else 'NO'}")
        torch.cuda.empty_cache()
    print(f"Flux-dev block layers (304), projected: eager {tot_e:.0f} s, graph {tot_g:.0f} s "
          f"({tot_e / tot_g:.2f}x); integers bit-identical on every shape: {'yes' if all_same else 'NO'}")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
