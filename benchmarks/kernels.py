"""Benchmark of the INT8 kernels against bf16 F.linear, eager torch._int_mm W8A8 and comfy-kitchen.

One run on one CUDA card: checks every variant against a float64 reference on fresh random data,
then times each with ``triton.testing.do_bench(..., return_mode="median")`` and prints the tables last
(ms and speed-up vs bf16 ``F.linear`` measured in the same run), raw int8 GEMM TOPS, a path sweep over
small M (the data behind ``kernels.dispatch.PATH_TABLE``) and the PERFORMANCE.md targets.

    python benchmarks/kernels.py                 # everything (a few minutes on an H100, most of it compiling)
    python benchmarks/kernels.py --shapes flux_qkv,proj_1024 --no-sweep
    python benchmarks/kernels.py --dry-run       # CPU smoke test of this script (interpreter, tiny shapes)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

SHAPES = {  # name: (M, K, N)
    "flux_qkv": (4608, 3072, 9216),
    "flux_mlp_up": (4608, 3072, 12288),
    "flux_mlp_down": (4608, 12288, 3072),
    "proj_1024": (1024, 3072, 3072),
    "wan_ffn_up": (32760, 5120, 13824),
    "wan_ffn_down": (32760, 13824, 5120),
}
DRY_SHAPES = {"tiny_a": (40, 256, 96), "tiny_b": (33, 512, 64)}
SWEEP_M = (1, 16, 64, 256, 1024)
TOL = {"bf16": 2e-2, "w8a16": 1e-2}  # everything else (activation int8 noise): 3e-2


def log(*a):
    print(*a, flush=True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().to(ref.device)
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


class Bench:
    def __init__(self, dry: bool, rep: int):
        self.dry, self.rep = dry, rep

    def graph(self, fn) -> float:
        """GPU time without launch overhead (CUDA-graph replay); NaN where capture fails."""
        if self.dry:
            return float("nan")
        from triton.testing import do_bench_cudagraph
        try:
            fn()  # tuned and compiled before capture
            return do_bench_cudagraph(fn, rep=self.rep, return_mode="median")
        except Exception as e:
            log(f"cuda graph timing failed: {type(e).__name__}: {e}")
            return float("nan")

    def __call__(self, fn) -> float:
        if self.dry:  # wall clock of one call, just to exercise the script
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=self.rep, return_mode="median")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-ck", action="store_true", help="skip comfy-kitchen")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--no-per-call", action="store_true",
                    help="skip the per-call table (benchmarks/per_call.py: one synchronised call, host us per call)")
    args = ap.parse_args()
    dry = args.dry_run
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["CONVERT_TO_QUANT_KERNEL_BACKEND"] = "triton"
    elif not torch.cuda.is_available():
        log("needs a CUDA GPU (or --dry-run)")
        return 2

    import triton
    import convert_to_quant.kernels as K
    from convert_to_quant.kernels import launch as L
    from convert_to_quant.quant_core.formats import Int8Blockwise, Int8Tensorwise

    ck = None
    ck_version = "n/a"
    if not args.no_ck and not dry:
        try:
            import comfy_kitchen as ck  # noqa: F811
            ck_version = getattr(ck, "__version__", "?")
        except Exception as e:  # pragma: no cover
            log(f"comfy-kitchen not importable: {e}")
            ck = None
    dev = torch.device("cpu" if dry else "cuda")
    if dry:
        header = f"DRY RUN on CPU (interpreter); torch {torch.__version__}; triton {triton.__version__}"
    else:
        props = torch.cuda.get_device_properties(dev)
        header = (f"card: {props.name} ({props.multi_processor_count} SMs, cc {props.major}.{props.minor}); "
                  f"torch {torch.__version__}; triton {triton.__version__}; comfy-kitchen {ck_version}")
    log(header)
    bench = Bench(dry, args.rep)
    t_start = time.time()
    shapes = DRY_SHAPES if dry else SHAPES
    names = args.shapes.split(",") if args.shapes else list(shapes)
    failures = []

    # ---- ceilings: a large square GEMM in bf16 (cuBLAS), int8 (ours, torch._int_mm)
    ceil = {}
    if not dry:
        s = 8192
        a8 = torch.randint(-127, 128, (s, s), device=dev, dtype=torch.int8)
        b8 = torch.randint(-127, 128, (s, s), device=dev, dtype=torch.int8)
        sa = torch.rand(s, device=dev) + 0.5
        sb = torch.rand(s, device=dev) + 0.5
        bias8 = torch.randn(s, device=dev, dtype=torch.bfloat16)
        ab = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
        bb = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
        flops = 2.0 * s ** 3
        ceil["bf16 cuBLAS TFLOPS"] = flops / bench(lambda: torch.mm(ab, bb)) / 1e9
        ceil["int8 ours TOPS"] = flops / bench(lambda: L.launch_int8_gemm(a8, sa, b8, sb, bias8, torch.bfloat16)) / 1e9
        try:
            b8t = b8.t()
            ceil["int8 torch._int_mm TOPS"] = flops / bench(lambda: torch._int_mm(a8, b8t)) / 1e9
        except Exception as e:
            log(f"_int_mm 8192: {e}")
        log("ceilings 8192^3: " + ", ".join(f"{k}={v:.0f}" for k, v in ceil.items()))
        del a8, b8, ab, bb
        torch.cuda.empty_cache()

    rows = []
    for name in names:
        m, k, n = shapes[name]
        try:
            rows.append(run_shape(name, m, k, n, dev, bench, K, L, ck, Int8Tensorwise, Int8Blockwise, failures))
        except Exception as e:
            traceback.print_exc()
            failures.append(f"{name}: {type(e).__name__}: {e}")
        if not dry:
            torch.cuda.empty_cache()

    sweep = []
    if not args.no_sweep:
        try:
            sweep = run_sweep(dev, bench, K, ck, Int8Tensorwise, Int8Blockwise, dry)
        except Exception as e:
            traceback.print_exc()
            failures.append(f"sweep: {type(e).__name__}: {e}")

    log("\n=== tuner choices (GEMM only, us) ===")
    for line in L.TUNER.log:
        log(line)
    print_tables(header, rows, sweep, ceil, time.time() - t_start)
    if not args.no_per_call:
        # beside do_bench: what one lone call costs (CUDA events around single synchronised calls) and the
        # host microseconds per call, for the same GEMM shapes and the small-M sweep
        import per_call
        log("\n=== per synchronised call (benchmarks/per_call.py) ===")
        pc_args = ["--no-paths", "--calls", "5" if dry else "200"]
        if not dry:
            pc_args += ["--shapes", "flux_qkv,flux_mlp_up,flux_mlp_down,t5_ffn," + ",".join(f"m{m}_3072" for m in SWEEP_M)]
        if per_call.main(pc_args + (["--dry-run"] if dry else [])) != 0:
            failures.append("per-call: correctness check failed")
    if failures:
        log("\nFAILURES:\n  " + "\n  ".join(failures))
        return 1
    log("\nall correctness checks passed")
    return 0


def run_shape(name, m, k, n, dev, bench, K, L, ck, Int8Tensorwise, Int8Blockwise, failures):
    g = torch.Generator(device=dev).manual_seed(1234 + m + k + n)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device=dev, generator=g) * 0.02
    bias = (torch.randn(n, device=dev, generator=g) * 0.1).to(torch.bfloat16)
    qrow = Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row"), torch.bfloat16)
    qrot = Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row", True, 256), torch.bfloat16)
    qblk = Int8Blockwise.quantize(w, Int8Blockwise.Params(128), torch.bfloat16)
    w_bf16 = w.to(torch.bfloat16)
    del w
    variants = {
        "bf16": lambda: F.linear(x, w_bf16, bias),
        "w8a8": lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias, path="w8a8"),
        "w8a8_convrot": lambda: K.int8_linear(x, qrot.qdata, qrot.scale, bias, convrot_groupsize=256, path="w8a8"),
        "blockwise": lambda: K.int8_blockwise_linear(x, qblk.qdata, qblk.scale, bias, group_size=128, path="w8a8"),
        "w8a16": lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias, path="w8a16"),
        "auto": lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias),
        "eager_int_mm": lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias, path="w8a8", backend="torch"),
    }
    ref_of = {"w8a8_convrot": "rot", "blockwise": "blk", "ck_convrot": "rot"}
    if ck is not None:
        ck_scale = qrow.scale.reshape(-1)
        ck_rot_scale = qrot.scale.reshape(-1)
        variants["comfy_kitchen"] = lambda: ck.int8_linear(x, qrow.qdata, ck_scale, bias, out_dtype=torch.bfloat16)
        variants["ck_convrot"] = lambda: ck.int8_linear(x, qrot.qdata, ck_rot_scale, bias, out_dtype=torch.bfloat16,
                                                        convrot=True, convrot_groupsize=256)
    # ---- correctness on sampled rows against float64 with the dequantized weights (fresh random data)
    idx = torch.unique(torch.cat([torch.randint(0, m, (96,), device=dev, generator=g),
                                  torch.tensor([0, m - 1], device=dev)]))
    xs = x[idx].double()
    refs = {kind: xs @ q.dequantize().to(dev).double().T + bias.double()
            for kind, q in (("row", qrow), ("rot", qrot), ("blk", qblk))}
    errs = {}
    for vname in list(variants):
        try:
            out = variants[vname]()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            e = rel_err(out[idx], refs[ref_of.get(vname, "row")])
        except Exception as ex:
            traceback.print_exc()
            e = float("nan")
            log(f"{name}/{vname}: FAILED {type(ex).__name__}: {ex}")
        errs[vname] = e
        if not (e < TOL.get(vname, 3e-2)):
            failures.append(f"{name}/{vname} rel err {e}")
            if vname != "bf16":
                variants.pop(vname)
    # the W8A8 kernel against exact integer math on the same quantized activations (fp32 output)
    qa, sa = K.quantize_activations(x[idx])
    exact = ((qa.double() @ qrow.qdata.double().T) * sa.double() * qrow.scale.double().reshape(1, -1)
             + bias.double())
    e_exact = rel_err(K.int8_linear(x[idx], qrow.qdata, qrow.scale, bias, path="w8a8", out_dtype=torch.float32), exact)
    if not (e_exact < 1e-5):
        failures.append(f"{name}/w8a8 vs exact integer math: {e_exact}")
    log(f"{name}: rel err vs float64 " + ", ".join(f"{v}={e:.2e}" for v, e in errs.items())
        + f"; w8a8 (fp32 out) vs exact integer math {e_exact:.1e}")
    # ---- timing: every variant right next to a bf16 run (ratios immune to clock drift from heat);
    # the long W8A16 runs last
    times, bf = {}, []
    for v in [v for v in variants if v not in ("bf16", "w8a16")] + [v for v in ("w8a16",) if v in variants]:
        times[v] = bench(variants[v])
        tb = bench(variants["bf16"])
        times["r_" + v] = tb / times[v]
        bf.append(tb)
    times["bf16"] = sorted(bf)[len(bf) // 2]
    qa_full, sa_full = K.quantize_activations(x)
    times["quant"] = bench(lambda: K.quantize_activations(x))
    times["quant_rot"] = bench(lambda: K.quantize_activations(x, 256))
    sa1, ws1 = sa_full.reshape(-1), qrow.scale.reshape(-1)
    # same bias as the linear so the tuned kernel is reused (the bias add is negligible)
    times["raw_ours"] = bench(lambda: L.launch_int8_gemm(qa_full, sa1, qrow.qdata, ws1, bias, torch.bfloat16))
    if dev.type == "cuda":
        qw_t = qrow.qdata.t()
        try:
            times["raw_int_mm"] = bench(lambda: torch._int_mm(qa_full, qw_t))
        except Exception as ex:
            log(f"torch._int_mm failed: {ex}")
    if dev.type == "cuda" and k >= 3072 and name != "proj_1024":  # the three convrot implementations
        saved = L.ROT_IMPL
        for impl in (0, 1, 2):  # each forced (the library tunes between 0 and 2)
            L.ROT_IMPL = impl
            L._ACT_META.clear()
            try:
                times[f"quant_rot_impl{impl}"] = bench(lambda: K.quantize_activations(x, 256))
            except Exception as ex:
                log(f"rot impl {impl}: {type(ex).__name__}: {ex}")
        L.ROT_IMPL = saved
        L._ACT_META.clear()
    if m <= 1024:  # launch overhead matters here: also the GPU-only time
        times["bf16_graph"] = bench.graph(variants["bf16"])
        if "auto" in variants:
            times["auto_graph"] = bench.graph(variants["auto"])
    log(f"{name}: " + ", ".join(f"{v}={t:.4f}" + ("x" if v.startswith("r_") else "ms") for v, t in times.items()))
    return name, m, k, n, times, errs


def run_sweep(dev, bench, K, ck, Int8Tensorwise, Int8Blockwise, dry):
    k = n = 256 if dry else 3072
    w = torch.randn(n, k, device=dev) * 0.02
    qrow = Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row"), torch.bfloat16)
    qblk = Int8Blockwise.quantize(w, Int8Blockwise.Params(128), torch.bfloat16)
    wb = w.to(torch.bfloat16)
    bias = (torch.randn(n, device=dev) * 0.1).to(torch.bfloat16)
    sweep = []
    for m in (SWEEP_M[:2] if dry else SWEEP_M):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        t = {"bf16": bench(lambda: F.linear(x, wb, bias))}
        for p in ("w8a8", "w8a16", "dequant"):
            t["row_" + p] = bench(lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias, path=p))
            t["blk_" + p] = bench(lambda: K.int8_blockwise_linear(x, qblk.qdata, qblk.scale, bias, path=p))
        t["row_auto"] = bench(lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias))
        t["blk_auto"] = bench(lambda: K.int8_blockwise_linear(x, qblk.qdata, qblk.scale, bias))
        t["bf16_graph"] = bench.graph(lambda: F.linear(x, wb, bias))
        t["row_auto_graph"] = bench.graph(lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias))
        if ck is not None:
            ck_s = qrow.scale.reshape(-1)
            t["ck"] = bench(lambda: ck.int8_linear(x, qrow.qdata, ck_s, bias, out_dtype=torch.bfloat16))
        sweep.append((m, t))
        log(f"sweep M={m}: " + ", ".join(f"{v}={tt * 1e3:.1f}us" for v, tt in t.items()))
    return sweep


def print_tables(header, rows, sweep, ceil, wall):
    def cell(times, v):
        if v not in times:
            return "n/a"
        return f"{times[v]:.3f} ({times['r_' + v]:.2f}x)"

    log("\n=== " + header + " ===")
    log(f"command: python benchmarks/kernels.py {' '.join(sys.argv[1:])}; wall {wall:.0f}s")
    if ceil:
        log("ceilings, 8192x8192x8192: " + ", ".join(f"{k} {v:.0f}" for k, v in ceil.items()))
    cols = ["bf16", "w8a8", "w8a8_convrot", "blockwise", "w8a16", "auto", "eager_int_mm", "comfy_kitchen",
            "ck_convrot"]
    log("\n| shape M×K→N | bf16 ms | " + " | ".join(c + " ms (×bf16)" for c in cols[1:])
        + " | raw int8 TOPS ours / _int_mm | act quant µs plain (GB/s) / convrot256 |")
    log("|" + "---|" * (len(cols) + 3))
    for name, m, k, n, times, errs in rows:
        flops = 2.0 * m * n * k
        raw = f"{flops / times['raw_ours'] / 1e9:.0f}"
        raw += f" / {flops / times['raw_int_mm'] / 1e9:.0f}" if "raw_int_mm" in times else " / n/a"
        cells = [f"{times['bf16']:.3f}"] + [cell(times, c) for c in cols[1:]]
        log(f"| {name} {m}×{k}→{n} | " + " | ".join(cells)
            + f" | {raw} | {times['quant'] * 1e3:.0f} ({m * k * 3 / times['quant'] / 1e6:.0f} GB/s)"
            + f" / {times['quant_rot'] * 1e3:.0f} |")
    if sweep:
        log("\npath sweep, K=N=3072 with bias, µs (×bf16):")
        keys = [k for k in sweep[0][1] if k != "bf16"]
        log("| M | bf16 µs | " + " | ".join(keys) + " |")
        log("|" + "---|" * (len(keys) + 2))
        for m, t in sweep:  # graph columns are compared with the bf16 graph replay
            log(f"| {m} | {t['bf16'] * 1e3:.1f} | "
                + " | ".join(f"{t[v] * 1e3:.1f} ({t['bf16_graph' if v.endswith('_graph') else 'bf16'] / t[v]:.2f}x)"
                             for v in keys) + " |")

    log("\n=== targets ===")
    for name, m, k, n, times, errs in rows:
        r = lambda v: times.get("r_" + v, float("nan"))  # noqa: E731
        flops = 2.0 * m * n * k
        msg = [f"raw {flops / times['raw_ours'] / 1e9:.0f} TOPS (>=1300)"]
        if m >= 4096:
            msg.append(f"w8a8 {r('w8a8'):.2f}x bf16 (>=1.5)")
            if "comfy_kitchen" in times and "w8a8" in times:
                msg.append(f"{r('w8a8') / r('comfy_kitchen'):.2f}x comfy-kitchen (>=1.4)")
        msg.append(f"blockwise {r('blockwise'):.2f}x (>=1.3)")
        if "w8a8_convrot" in times and "w8a8" in times:  # each against its adjacent bf16 run
            msg.append(f"convrot +{(r('w8a8') / r('w8a8_convrot') - 1) * 100:.1f}% over w8a8 (<=10%)")
        if m <= 1024:
            msg.append(f"auto {r('auto'):.2f}x (>=0.9)")
        if "auto_graph" in times:
            msg.append(f"CUDA-graph replay: bf16 {times['bf16_graph'] * 1e3:.1f}us, auto {times['auto_graph'] * 1e3:.1f}us")
        log(f"{name}: " + "; ".join(msg))
    for m, t in sweep:
        log(f"sweep M={m}: auto row {t['bf16'] / t['row_auto']:.2f}x, block {t['bf16'] / t['blk_auto']:.2f}x (>=0.9); "
            f"GPU-only (graph replay) row {t['bf16_graph'] / t['row_auto_graph']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
