"""One int8 layer on the CPU fallback, against the float layer: the numbers behind the dequant path's
choices (docs/KERNELS.md, "CPU / non-Triton fallback").

Part 1 (chunk orientation): for each shape M x K -> N, ``F.linear`` on the float weight against the
prepared CPU call (``kernels.prepare_linear`` -> ``reference.DequantLinear``) with the weight chunked
along its rows and along K (``reference.K_CHUNK_MIN_RATIO`` switched for the run), same budget.

Part 2 (a scratch just written): ``F.linear`` on a weight that the previous op (an int8 -> fp32 copy by
torch's threads) has just written, against the same GEMM on a weight nobody wrote: what the copy costs
beyond its own time when the GEMM's threads read another core's writes.

Part 3 (the int8 GEMM): per layer size, ``F.linear`` on the float weight against the prepared call on the
dequant path and on the int8 GEMM (``reference.cpu_int8_linear``: per-token int8 activations,
``torch._int_mm``), calls of the three interleaved: the numbers behind ``reference.CPU_INT8_MIN_NK``.

Every int8 result is checked against the float layer first (fp32 tolerance; the int8 GEMM: W8A8's).
Times are medians of ``--calls`` calls after a warm-up; ratios are float / int8 from the same run.

    python benchmarks/cpu_fallback_layers.py --threads 2
    python benchmarks/cpu_fallback_layers.py --threads 2 --parts 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (M, K, N): the Wan-1.3B FFN at 546 tokens, wider / narrower inputs, a square layer
SHAPES = [(546, 1536, 8960), (546, 8960, 1536), (546, 6144, 1536), (546, 3072, 1536), (546, 4096, 4096)]


def median_us(fn, calls: int) -> float:
    for _ in range(max(2, calls // 10)):
        fn()
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def int8_layer(n: int, k: int, seed: int):
    from convert_to_quant.quant_core.formats import Int8Tensorwise
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    return Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row"), torch.float32)


def part1(shapes, calls: int, budget_mb: float) -> list:
    import convert_to_quant.kernels as K
    from convert_to_quant.kernels import reference as R
    os.environ[R.DEQUANT_CHUNK_ENV] = str(budget_mb)
    failures = []
    print(f"part 1: float / int8 per call (x fp32, {budget_mb} MiB dequant budget, median of {calls})")
    print("| M×K→N | float ms | row chunks ms (×) | K chunks ms (×) |")
    print("|---|---|---|---|")
    for m, k, n in shapes:
        qw = int8_layer(n, k, m + k + n)
        layer = K.prepare_linear(qw, torch.device("cpu"))
        wf = qw.dequantize().float()
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
        ref = F.linear(x, wf)
        res = {}
        saved = R.K_CHUNK_MIN_RATIO
        for name, ratio in (("rows", float("inf")), ("k", 0)):
            R.K_CHUNK_MIN_RATIO = ratio
            try:
                err = float((layer(x, None, "dequant") - ref).norm() / ref.norm())
                if not err < 1e-5:
                    failures.append(f"{m}x{k}->{n} {name}: rel err {err:.2e}")
                res[name] = median_us(lambda: layer(x, None, "dequant"), calls)
            finally:
                R.K_CHUNK_MIN_RATIO = saved
        t = median_us(lambda: F.linear(x, wf), calls)
        print(f"| {m}×{k}→{n} | {t / 1e3:.1f} | {res['rows'] / 1e3:.1f} ({t / res['rows']:.2f}×) | "
              f"{res['k'] / 1e3:.1f} ({t / res['k']:.2f}×) |", flush=True)
    return failures


# (M, K, N) for part 3: square layers around the threshold, the Wan-1.3B layers, few tokens
SIZE_SHAPES = [(546, 256, 256), (546, 512, 512), (546, 512, 1024), (546, 768, 768), (546, 1024, 1024),
               (546, 1536, 1536), (546, 1536, 8960), (546, 8960, 1536), (16, 1536, 1536), (64, 1536, 1536)]


def part3(shapes, calls: int) -> list:
    import convert_to_quant.kernels as K
    from convert_to_quant.kernels import reference as R
    min_nk = R.cpu_int8_min_nk()
    probe = R._CPU_INT8_PROBE.get("ratios")
    print(f"\npart 3: float / int8 per call, dequant path vs int8 GEMM (x fp32, median of {calls}, interleaved); "
          f"the \"cpu\" path takes the int8 GEMM from {min_nk:.0f} weights"
          + (" (probe, int8 / dequant time: " + ", ".join(f"{n}² {r:.2f}" for n, r in probe.items()) + ")"
             if probe else " (env)"))
    print("| M×K→N | weights | float ms | dequant ms (×) | int8 GEMM ms (×) |")
    print("|---|---|---|---|---|")
    failures = []
    for m, k, n in shapes:
        qw = int8_layer(n, k, m + k + n)
        fb = K.prepare_linear(qw, torch.device("cpu")).fallback
        wf = qw.dequantize().float()
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
        ref = F.linear(x.double(), wf.double())
        fns = {"float": lambda: F.linear(x, wf), "dequant": lambda: fb(x, None, torch.float32),
               "int8": lambda: fb.w8a8(x, None, torch.float32)}
        for name, tol in (("dequant", 1e-5), ("int8", 2e-2)):
            err = float((fns[name]().double() - ref).norm() / ref.norm())
            if not err < tol:
                failures.append(f"{m}x{k}->{n} {name}: rel err {err:.2e}")
        ts = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for _ in range(calls):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                ts[name].append(time.perf_counter() - t0)
        t = {name: statistics.median(v) * 1e3 for name, v in ts.items()}
        print(f"| {m}×{k}→{n} | {n * k / 2 ** 20:.2f}M | {t['float']:.2f} | {t['dequant']:.2f} "
              f"({t['float'] / t['dequant']:.2f}×) | {t['int8']:.2f} ({t['float'] / t['int8']:.2f}×) |", flush=True)
    return failures


def part2(calls: int) -> None:
    n = k = 256
    print(f"\npart 2: a 256×256 fp32 weight, 16 tokens, µs per call (median of {calls})")
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(3))
    wf = q.float()
    buf = torch.empty(n, k)
    x = torch.randn(16, k)
    cases = {
        "F.linear(x, weight)": lambda: F.linear(x, wf),
        "copy int8 -> scratch, then F.linear(x, weight)": lambda: (buf.copy_(q), F.linear(x, wf)),
        "copy int8 -> scratch, then F.linear(x, scratch)": lambda: (buf.copy_(q), F.linear(x, buf)),
        "F.linear(x, scratch), nothing written before": lambda: F.linear(x, buf),
        "copy int8 -> scratch alone": lambda: buf.copy_(q),
    }
    for name, fn in cases.items():
        print(f"  {name}: {median_us(fn, calls):.1f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=15, help="part 1 calls per variant (part 2: 20x)")
    ap.add_argument("--budget-mb", type=float, default=8.0, help="the dequant scratch budget (the default's)")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run (comma list)")
    ap.add_argument("--dry-run", action="store_true", help="small shapes, few calls (a smoke run)")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.dirname(REPO))
    os.environ["CONVERT_TO_QUANT_KERNEL_BACKEND"] = "torch"
    torch.set_num_threads(args.threads)
    shapes = [(40, 640, 64), (40, 64, 640)] if args.dry_run else SHAPES
    budget = 0.05 if args.dry_run else args.budget_mb
    calls = 3 if args.dry_run else args.calls
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; load average "
          f"{os.getloadavg()[0]:.2f}")
    parts = set(args.parts.split(","))
    failures = part1(shapes, calls, budget) if "1" in parts else []
    if "2" in parts:
        part2(calls * 20)
    if "3" in parts:
        from convert_to_quant.kernels.reference import DEQUANT_CHUNK_ENV
        os.environ.pop(DEQUANT_CHUNK_ENV, None)  # part 3 runs the default budget
        failures += part3([(40, 256, 2048), (40, 2048, 256)] if args.dry_run else SIZE_SHAPES,
                          calls if args.dry_run else max(calls, 21))
    from per_call import report_failures  # this folder is on sys.path when a benchmark runs as a script
    return report_failures(failures)


if __name__ == "__main__":
    sys.exit(main())
