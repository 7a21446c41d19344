"""What a LoRA side path costs an int8 linear layer at step shapes (issue 13: 2 rank-32 LoRAs <= 1.10x).

The loader adds a layer's LoRAs as ``y = int8_gemm(x) + (x · downᵀ) · upᵀ``: one skinny GEMM ``h = x · downᵀ``
(cuBLAS) and the up-projection in the int8 GEMM's epilogue (``lora=(h, up)``). Per shape, GPU time
(``triton.testing.do_bench``, back to back) of:

* ``int8``: the int8 linear alone (activation pass + GEMM);
* ``+lora``: with the LoRA pair, the tuner's config for it (``launch._unflattened_twins``: persistent configs
  also unflattened, so the epilogue's shared memory fits two CTAs per SM);
* ``int8 flat`` / ``+lora flat``: the same with the twins turned off (the candidates before round 6);
* ``+lora unfused``: the int8 linear, then ``y.addmm_(h, upᵀ)`` (no epilogue);
* ``bf16`` / ``bf16+lora``: ``F.linear`` and the stock float LoRA (``addmm`` of the two skinny GEMMs).

Every variant's output is checked against float64 on a row sample first.

    python benchmarks/lora_epilogue.py              # CUDA
    python benchmarks/lora_epilogue.py --dry-run    # CPU interpreter, tiny shapes
"""
from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (M, K, N): Wan-14B 720p (2 x 3600 tokens) and Flux-dev 1024^2 (4608 tokens)
SHAPES = {
    "wan_qkv": (7200, 5120, 5120),
    "wan_ffn_up": (7200, 5120, 13824),
    "wan_ffn_down": (7200, 13824, 5120),
    "flux_qkv": (4608, 3072, 9216),
    "flux_mlp_down": (4608, 12288, 3072),
}
DRY_SHAPES = {"dry_a": (40, 64, 96), "dry_b": (70, 96, 64)}


def log(*a):
    print(*a, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank of the layer (2 LoRAs of rank 32 = 64)")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.dirname(REPO))
    import torch
    import torch.nn.functional as F
    pkg = os.path.basename(REPO)
    kernels = __import__(f"{pkg}.kernels", fromlist=["x"])
    launch = __import__(f"{pkg}.kernels.launch", fromlist=["x"])
    from triton.testing import do_bench

    dev = torch.device("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU (use --dry-run)")
    shapes = DRY_SHAPES if args.dry_run else {s: SHAPES[s] for s in args.shapes.split(",")}
    dt = torch.float32 if args.dry_run else torch.bfloat16  # the interpreter's bf16 dot is not exact
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    log(f"device: {card}; torch {torch.__version__}; LoRA rank {args.rank}")
    twins = launch._unflattened_twins

    def bench(fn):
        if args.dry_run:
            fn()
            return float("nan")
        return do_bench(fn, warmup=25, rep=200, return_mode="median")

    rows = []
    for name, (m, k, n) in shapes.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g).to(dev, dt)
        w = torch.randn(n, k, generator=g) / k ** 0.5
        s = w.abs().amax(1, keepdim=True) / 127
        q = torch.round(w / s).clamp(-127, 127).to(torch.int8).to(dev)
        s = s.reshape(-1).to(dev)
        down = (torch.randn(args.rank, k, generator=g) / k ** 0.5).to(dev, dt)
        up = (torch.randn(n, args.rank, generator=g) * 0.05).to(dev, dt)
        wf = (q.float() * s[:, None]).to(dt)

        def int8():
            return kernels.int8_linear(x, q, s)

        def lora():
            return kernels.int8_linear(x, q, s, lora=(x @ down.t(), up))

        def unfused():
            y = kernels.int8_linear(x, q, s)
            return y.addmm_(x @ down.t(), up.t())

        def bf16():
            return F.linear(x, wf)

        def bf16_lora():
            return F.linear(x, wf).addmm_(x @ down.t(), up.t())

        # float64 reference on a row sample (the int8 outputs carry activation quantization noise)
        rs = torch.arange(0, m, max(1, m // 64), device=dev)
        xr = x[rs].double()
        want = xr @ wf.double().t() + (xr @ down.double().t()) @ up.double().t()
        for fn, tol in ((lora, 2e-2), (unfused, 2e-2), (bf16_lora, 1e-2)):
            got = fn()[rs].double()
            err = float((got - want).norm() / want.norm())
            if not err < tol:
                log(f"FAIL {name} {fn.__name__}: relative error {err:.3g} vs float64")
                return 1
        t = {"int8": bench(int8), "+lora": bench(lora), "+lora unfused": bench(unfused)}
        launch._unflattened_twins = lambda c, first=True: c
        launch.TUNER.choice = {}
        try:
            t["int8 flat"] = bench(int8)
            t["+lora flat"] = bench(lora)
        finally:
            launch._unflattened_twins = twins
            launch.TUNER.choice = {}
        int8(), lora()  # tuned again, with the twins
        t["bf16"] = bench(bf16)
        t["bf16+lora"] = bench(bf16_lora)
        t["h = x·downᵀ"] = bench(lambda: x @ down.t())
        rows.append((name, m, k, n, t))
        log(f"{name} {m}x{k}->{n}: " + ", ".join(f"{kk} {v * 1e3:.1f} us" for kk, v in t.items())
            + (f"; +lora / int8 {t['+lora'] / t['int8']:.3f} (before round 6: {t['+lora flat'] / t['int8 flat']:.3f}; "
               f"int8 flat / int8 {t['int8 flat'] / t['int8']:.3f}; unfused "
               f"{t['+lora unfused'] / t['int8']:.3f}); bf16+lora / bf16 {t['bf16+lora'] / t['bf16']:.3f}"
               if not args.dry_run else ""))
    for line in launch.TUNER.log:
        if "w8a16" not in line:
            log("tuner:", line[:400])
    log("checked against float64: all variants OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
