"""Attention-only benchmark: INT8 attention (``kernels/attention.py``) vs torch SDPA in bf16 (flash backend,
and torch's default choice), at Wan-14B shapes: batch 2 (cond + uncond), 40 heads x 128, 14,040 tokens
(480p, 33 frames) and 32,760 tokens (480p, 81 frames).

For each shape: a correctness check of the compiled kernel against the torch reference of the same
quantized math (quantized Q/K bit for bit, output close), output cosine vs bf16 SDPA, then timings --
``triton.testing.do_bench`` (back to back, GPU time) and per synchronised call (wall time of one call with
the host work, median) -- for SDPA flash, SDPA default, INT8 attention (quantization + attention) and the
INT8 attention kernel alone. Inputs are ComfyUI's layout: (B, L, H·D) activations viewed as (B, H, L, D).

    python benchmarks/attention.py                 # CUDA: 14040 and 32760 tokens
    python benchmarks/attention.py --tokens 4096   # other shapes
    python benchmarks/attention.py --tiny          # CPU dry run (torch reference; interpreter with --interpret)

Prints one ``RESULT {json}`` line at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*a):
    print(*a, flush=True)


def load_repo_package():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from comfy_step import load_repo_package as load  # one definition (ComfyUI not needed)
    return load()


def cosine(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def per_call_ms(fn, dev, reps: int) -> float:
    import torch
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        s = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - s) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="14040,32760", help="comma list of sequence lengths (self-attention)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128, choices=[64, 128])
    ap.add_argument("--std", type=float, default=1.0, help="std of the random Q/K (larger: sharper softmax)")
    ap.add_argument("--reps", type=int, default=10, help="per synchronised call repetitions")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: 2 heads x 64, 300 tokens, torch reference")
    ap.add_argument("--interpret", action="store_true", help="with --tiny: the Triton kernels in the interpreter")
    args = ap.parse_args(argv)
    if args.interpret:
        if not args.tiny:
            sys.exit("error: --interpret only with --tiny")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    load_repo_package()
    import torch
    import torch.nn.functional as F
    from convert_to_quant.kernels import attention as A
    from convert_to_quant.kernels.launch import TUNER

    if args.tiny:
        dev = torch.device("cpu")
        args.batch, args.heads, args.head_dim, args.reps = 1, 2, 64, 2
        tokens = [300]
        backend = "triton" if args.interpret else "torch"
    else:
        if not torch.cuda.is_available():
            sys.exit("error: needs a CUDA GPU (use --tiny for the CPU dry run)")
        dev = torch.device("cuda")
        tokens = []
        for t in args.tokens.split(","):
            if not t.strip().isdigit() or int(t) < 1:
                sys.exit(f"error: --tokens entry {t!r} is not a positive integer")
            tokens.append(int(t))
        backend = A.attention_backend(dev, torch.bfloat16)
        if backend != "triton":
            sys.exit(f"error: the Triton attention kernel does not run on this GPU (backend: {backend})")
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    b, h, d = args.batch, args.heads, args.head_dim
    log(f"device: {card}; torch {torch.__version__}; backend {backend}; batch {b}, {h} heads x {d}; "
        f"Q/K std {args.std}")

    results = {}
    failed = False
    for n in tokens:
        g = torch.Generator(device=dev).manual_seed(0)

        def act(std=1.0, bias=0.0):  # ComfyUI's (B, L, H*D) activations as (B, H, L, D) views
            x = torch.randn(b, n, h * d, generator=g, device=dev, dtype=torch.float32) * std + bias
            return x.to(torch.bfloat16).view(b, n, h, d).transpose(1, 2)
        q, k, v = act(args.std), act(args.std, 0.5), act()
        flops = 4 * b * h * n * n * d
        log(f"\n== {n} tokens: {flops / 1e12:.1f} TFLOP per call ==")

        # --- correctness: compiled kernel vs the torch reference of the same math ---------------------
        sm = d ** -0.5
        t0 = time.time()
        tri_q = A.quantize_qk_triton(q, k, sm) if backend == "triton" else A.quantize_qk_reference(q, k, sm)
        ref_q = A.quantize_qk_reference(q, k, sm)
        quant_equal = all(torch.equal(x, y) for x, y in zip(tri_q, ref_q))
        pv_auto = A.pv_mode(dev, backend)
        # the reference materialises fp32 scores in chunks: compare on a slice of heads to bound time
        hs = min(h, 4)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION) \
                if dev.type == "cuda" else _null():
            sdpa = F.scaled_dot_product_attention(q, k, v)
        r = {"tokens": n, "quant_equal": quant_equal, "pv_auto": pv_auto}
        for pv in ("v", "fp8"):
            out = A.int8_attention(q, k, v, backend=backend, pv=pv)
            ref = A.reference_int8_attention(q[:, :hs], k[:, :hs], v[:, :hs], pv=pv)
            rel_ref = float((out[:, :, :hs].double() - ref.double()).norm() / ref.double().norm())
            cos = cosine(out, sdpa.transpose(1, 2))
            log(f"check P·V {pv}: quantized Q/K equal to the reference: {quant_equal}; output vs reference (heads "
                f"0-{hs - 1}): rel {rel_ref:.2e}; cosine vs bf16 SDPA {cos:.6f} (target >= 0.999) "
                f"[{time.time() - t0:.1f} s]")
            r[f"rel_vs_reference_{pv}"], r[f"cosine_vs_sdpa_{pv}"] = rel_ref, cos
            if not quant_equal or not rel_ref < (1e-2 if pv == "v" else 3e-2):
                log("CHECK FAILED: the kernel does not compute the reference's numerics (timings follow anyway)")
                failed = True
        r["cosine_vs_sdpa"] = r[f"cosine_vs_sdpa_{pv_auto}"]

        # --- timing --------------------------------------------------------------------------------
        def sdpa_flash():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        def sdpa_default():
            return F.scaled_dot_product_attention(q, k, v)

        quant = A.quantize_qk_triton(q, k, sm) if backend == "triton" else A.quantize_qk_reference(q, k, sm)
        tri = backend == "triton"
        v8 = (A.quantize_v_fp8_triton if tri else A.quantize_v_fp8_reference)(v)
        kern = A.attention_from_quantized_triton if tri else A.attention_from_quantized
        fns = {"int8": lambda: A.int8_attention(q, k, v, backend=backend),
               "int8 P·V bf16": lambda: A.int8_attention(q, k, v, backend=backend, pv="v"),
               "int8 P·V fp8": lambda: A.int8_attention(q, k, v, backend=backend, pv="fp8"),
               "int8 quantize only": (lambda: A.quantize_qk_triton(q, k, sm)) if tri
               else (lambda: A.quantize_qk_reference(q, k, sm)),
               "int8 V to fp8 only": (lambda: A.quantize_v_fp8_triton(v)) if tri
               else (lambda: A.quantize_v_fp8_reference(v)),
               "int8 kernel only": lambda: kern(*quant, v),
               "int8 kernel only fp8": lambda: kern(*quant, v, v8=v8)}
        if dev.type == "cuda":
            fns = {"sdpa flash bf16": sdpa_flash, "sdpa default bf16": sdpa_default, **fns}
        else:
            fns = {"sdpa bf16": sdpa_default, **fns}
        ms_bench, ms_call = {}, {}
        for name, fn in fns.items():
            fn()  # compile / tune outside the timings
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                from triton.testing import do_bench
                ms_bench[name] = do_bench(fn, warmup=25, rep=200, return_mode="median")
            ms_call[name] = per_call_ms(fn, dev, args.reps)
            tb = f"{ms_bench[name]:9.3f} ms do_bench, " if name in ms_bench else ""
            tf = flops / (ms_bench.get(name, ms_call[name]) * 1e-3) / 1e12
            log(f"{name:>20}: {tb}{ms_call[name]:9.3f} ms per synchronised call"
                + (f"  ({tf:.0f} TFLOPS)" if "only" not in name else ""))
        base = "sdpa flash bf16" if dev.type == "cuda" else "sdpa bf16"
        src = ms_bench if ms_bench else ms_call
        r.update(ms_do_bench=ms_bench, ms_per_call=ms_call, speedup_vs_sdpa_flash=src[base] / src["int8"],
                 speedup_per_call=ms_call[base] / ms_call["int8"])
        if "sdpa default bf16" in src:
            r["speedup_vs_sdpa_default"] = src["sdpa default bf16"] / src["int8"]
        log(f"speed-up int8 (P·V {pv_auto}) vs {base}: {r['speedup_vs_sdpa_flash']:.3f}x (target >= 1.5); per "
            f"synchronised call {r['speedup_per_call']:.3f}x"
            + (f"; vs sdpa default {r['speedup_vs_sdpa_default']:.3f}x" if "speedup_vs_sdpa_default" in r else ""))
        results[str(n)] = r
        del q, k, v, out, sdpa, quant, v8
    if TUNER.log:
        log("\ntuning:\n  " + "\n  ".join(x for x in TUNER.log if "int8_attention" in x))
    log("\nRESULT " + json.dumps({"device": card, "batch": b, "heads": h, "head_dim": d, "backend": backend,
                                  "shapes": results}))
    return 1 if failed else 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    sys.exit(main())
