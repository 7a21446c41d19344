"""Benchmark of the INT8 kernels against bf16 F.linear, eager torch._int_mm W8A8 and comfy-kitchen.

One run on one CUDA card: checks every variant against a float64 reference on fresh random data,
then times each with ``triton.testing.do_bench(..., return_mode="median")`` and prints the table
(ms and speed-up vs bf16 ``F.linear`` measured in the same run), raw int8 GEMM TOPS, a path sweep over
small M (the data behind ``kernels.dispatch.PATH_TABLE``) and the targets of PERFORMANCE.md.

    python benchmarks/kernels.py                 # everything (about 3-5 minutes on an H100)
    python benchmarks/kernels.py --shapes flux_qkv,proj_1024 --no-sweep
"""
from __future__ import annotations

import argparse
import math
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
SWEEP_M = (1, 16, 64, 256, 1024)


def log(*a):
    print(*a, flush=True)


def bench(fn, rep=100):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-ck", action="store_true", help="skip comfy-kitchen")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        log("needs a CUDA GPU")
        return 2

    import triton
    import convert_to_quant.kernels as K
    from convert_to_quant.kernels import launch as L
    from convert_to_quant.kernels import reference as ref
    from convert_to_quant.quant_core.formats import Int8Blockwise, Int8Tensorwise

    ck = None
    if not args.no_ck:
        try:
            import comfy_kitchen as ck  # noqa: F811
            ck_version = getattr(ck, "__version__", "?")
        except Exception as e:  # pragma: no cover
            log(f"comfy-kitchen not importable: {e}")
            ck = None
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    header = (f"card: {props.name} ({props.multi_processor_count} SMs, cc {props.major}.{props.minor}); "
              f"torch {torch.__version__}; triton {triton.__version__}; "
              f"comfy-kitchen {ck_version if ck else 'n/a'}")
    log(header)
    t_start = time.time()

    rows = []
    failures = []
    for name in args.shapes.split(","):
        m, k, n = SHAPES[name]
        g = torch.Generator(device=dev).manual_seed(hash(name) % 1000)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        w = (torch.randn(n, k, device=dev, generator=g) * 0.02)
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g) * 0.1
        qrow = Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row"), torch.bfloat16)
        qrot = Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row", True, 256), torch.bfloat16)
        qblk = Int8Blockwise.quantize(w, Int8Blockwise.Params(128), torch.bfloat16)
        w_bf16 = w.to(torch.bfloat16)
        del w
        variants = {
            "bf16": lambda: F.linear(x, w_bf16, bias),
            "w8a8": lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias, path="w8a8"),
            "w8a8_convrot": lambda: K.int8_linear(x, qrot.qdata, qrot.scale, bias, convrot_groupsize=256,
                                                  path="w8a8"),
            "blockwise": lambda: K.int8_blockwise_linear(x, qblk.qdata, qblk.scale, bias, group_size=128,
                                                         path="w8a8"),
            "w8a16": lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias, path="w8a16"),
            "auto": lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias),
            "eager_int_mm": lambda: K.int8_linear(x, qrow.qdata, qrow.scale, bias, path="w8a8", backend="torch"),
        }
        if ck is not None:
            ck_scale = qrow.scale.reshape(-1)
            variants["comfy_kitchen"] = lambda: ck.int8_linear(x, qrow.qdata, ck_scale, bias,
                                                               out_dtype=torch.bfloat16)
        # ---- correctness on sampled rows (float64 reference of the dequantized weights)
        idx = torch.unique(torch.cat([torch.randint(0, m, (96,), device=dev, generator=g),
                                      torch.tensor([0, m - 1], device=dev)]))
        xs = x[idx].double()
        deq = {"row": qrow.dequantize().double(), "rot": qrot.dequantize().double(), "blk": qblk.dequantize().double()}
        refs = {kind: xs @ d.T + bias.double() for kind, d in deq.items()}
        ref_of = {"bf16": "row", "w8a8": "row", "w8a8_convrot": "rot", "blockwise": "blk", "w8a16": "row",
                  "auto": "row", "eager_int_mm": "row", "comfy_kitchen": "row"}
        tol = {"bf16": 2e-2, "w8a16": 1e-2}
        errs = {}
        for vname, fn in list(variants.items()):
            try:
                out = fn()
                torch.cuda.synchronize()
                e = rel_err(out[idx], refs[ref_of[vname]])
            except Exception as ex:
                e = float("nan")
                traceback.print_exc()
                log(f"{name}/{vname}: FAILED {type(ex).__name__}: {ex}")
            errs[vname] = e
            if not (e < tol.get(vname, 3e-2)):
                failures.append(f"{name}/{vname} rel err {e}")
                variants.pop(vname)
        # exactness of the W8A8 kernel against integer math in float64 (same quantized activations)
        qa, sa = K.quantize_activations(x[idx])
        exact = ((qa.double() @ qrow.qdata.double().T) * sa.double() * qrow.scale.double().reshape(1, -1)
                 + bias.double())
        e_exact = rel_err(K.int8_linear(x[idx], qrow.qdata, qrow.scale, bias, path="w8a8", out_dtype=torch.float32),
                          exact)
        if not (e_exact < 1e-5):
            failures.append(f"{name}/w8a8 vs exact integer math: {e_exact}")
        log(f"{name}: rel err vs float64 " + ", ".join(f"{v}={e:.2e}" for v, e in errs.items())
            + f"; w8a8 fp32-out vs exact int math {e_exact:.1e}")
        # ---- timing
        times = {}
        for vname, fn in variants.items():
            times[vname] = bench(fn, args.rep)
        qa_full, sa_full = K.quantize_activations(x)
        times["quant"] = bench(lambda: K.quantize_activations(x), args.rep)
        times["quant_rot"] = bench(lambda: K.quantize_activations(x, 256), args.rep)
        sa1 = sa_full.reshape(-1)
        ws1 = qrow.scale.reshape(-1)
        times["raw_ours"] = bench(lambda: L.launch_int8_gemm(qa_full, sa1, qrow.qdata, ws1, None, torch.bfloat16),
                                  args.rep)
        qw_t = qrow.qdata.t()
        try:
            times["raw_int_mm"] = bench(lambda: torch._int_mm(qa_full, qw_t), args.rep)
        except Exception as ex:
            log(f"torch._int_mm failed: {ex}")
        rows.append((name, m, k, n, times, errs))
        log(f"{name}: " + ", ".join(f"{v}={t:.4f}ms" for v, t in times.items()))
        del x, w_bf16, qrow, qrot, qblk, qa_full, deq
        torch.cuda.empty_cache()

    sweep = []
    if not args.no_sweep:
        k = n = 3072
        w = torch.randn(n, k, device=dev) * 0.02
        qrow = Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row"), torch.bfloat16)
        qblk = Int8Blockwise.quantize(w, Int8Blockwise.Params(128), torch.bfloat16)
        wb = w.to(torch.bfloat16)
        for m in SWEEP_M:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            t = {"bf16": bench(lambda: F.linear(x, wb), args.rep)}
            for p in ("w8a8", "w8a16", "dequant"):
                t["row_" + p] = bench(lambda: K.int8_linear(x, qrow.qdata, qrow.scale, path=p), args.rep)
                t["blk_" + p] = bench(lambda: K.int8_blockwise_linear(x, qblk.qdata, qblk.scale, path=p), args.rep)
            t["row_auto"] = bench(lambda: K.int8_linear(x, qrow.qdata, qrow.scale), args.rep)
            t["blk_auto"] = bench(lambda: K.int8_blockwise_linear(x, qblk.qdata, qblk.scale), args.rep)
            sweep.append((m, t))
            log(f"sweep M={m}: " + ", ".join(f"{v}={tt*1e3:.1f}us" for v, tt in t.items()))

    log("\n=== tuner choices ===")
    for line in L.TUNER.log:
        log(line)

    # ---- final tables
    def cell(times, v):
        if v not in times:
            return "n/a"
        return f"{times[v]:.3f} ({times['bf16'] / times[v]:.2f}x)"

    log("\n=== " + header + " ===")
    log(f"command: python benchmarks/kernels.py {' '.join(sys.argv[1:])}; wall {time.time() - t_start:.0f}s")
    cols = ["bf16", "w8a8", "w8a8_convrot", "blockwise", "w8a16", "auto", "eager_int_mm", "comfy_kitchen"]
    log("| shape M×K→N | " + " | ".join(c + " ms (× bf16)" if c != "bf16" else "bf16 ms" for c in cols)
        + " | raw int8 TOPS ours / _int_mm | act quant µs plain / convrot256 |")
    log("|" + "---|" * (len(cols) + 3))
    for name, m, k, n, times, errs in rows:
        flops = 2.0 * m * n * k
        raw = f"{flops / times['raw_ours'] / 1e9:.0f}"
        raw += f" / {flops / times['raw_int_mm'] / 1e9:.0f}" if "raw_int_mm" in times else " / n/a"
        cells = [f"{times['bf16']:.3f}"] + [cell(times, c) for c in cols[1:]]
        log(f"| {name} {m}×{k}→{n} | " + " | ".join(cells)
            + f" | {raw} | {times['quant'] * 1e3:.0f} / {times['quant_rot'] * 1e3:.0f} |")
    if sweep:
        log("\npath sweep, K=N=3072, µs (× bf16):")
        keys = [k for k in sweep[0][1] if k != "bf16"]
        log("| M | bf16 µs | " + " | ".join(keys) + " |")
        log("|" + "---|" * (len(keys) + 2))
        for m, t in sweep:
            log(f"| {m} | {t['bf16'] * 1e3:.1f} | "
                + " | ".join(f"{t[v] * 1e3:.1f} ({t['bf16'] / t[v]:.2f}x)" for v in keys) + " |")

    log("\n=== targets ===")
    for name, m, k, n, times, errs in rows:
        r = lambda v: times["bf16"] / times[v] if v in times else float("nan")  # noqa: E731
        flops = 2.0 * m * n * k
        msg = [f"raw {flops / times['raw_ours'] / 1e12:.0f} TOPS (>=1300)"]
        if m >= 4096:
            msg.append(f"w8a8 {r('w8a8'):.2f}x bf16 (>=1.5)")
            if "comfy_kitchen" in times:
                msg.append(f"{times['comfy_kitchen'] / times['w8a8']:.2f}x comfy-kitchen (>=1.4)")
        msg.append(f"blockwise {r('blockwise'):.2f}x (>=1.3)")
        msg.append(f"convrot +{(times['w8a8_convrot'] / times['w8a8'] - 1) * 100:.1f}% over w8a8 (<=10%)")
        if m <= 1024:
            msg.append(f"auto {r('auto'):.2f}x (>=0.9)")
        log(f"{name}: " + "; ".join(msg))
    for m, t in sweep:
        log(f"sweep M={m}: auto row {t['bf16'] / t['row_auto']:.2f}x, block {t['bf16'] / t['blk_auto']:.2f}x (>=0.9)")
    if failures:
        log("\nCORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        return 1
    log("\nall correctness checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
