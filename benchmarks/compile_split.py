"""Compiled W8A8: the activation quantization as one opaque op vs traced into inductor's graph.

Under ``torch.compile`` a W8A8 linear either stays one ``convert_to_quant::int8_linear`` op (our activation
kernel + our GEMM inside it) or is traced as torch ops for the quantization plus the
``convert_to_quant::scaled_int8_mm`` GEMM op (``kernels.dispatch.compile_split``), so that inductor can fuse
the quantization into whatever produced the activations. This script times Flux-dev-shaped sub-blocks
(what a double block's image stream does) compiled three ways in one process:

* ``bf16``: ``F.linear`` (cuBLAS);
* ``int8 opaque``: ``CONVERT_TO_QUANT_COMPILE_SPLIT=0``;
* ``int8 split``: the traced quantization.

Sub-blocks, on [1, tokens, 3072] bf16: ``qkv`` = LayerNorm → (1 + scale)·x + shift → qkv linear (3072→9216);
``mlp`` = LayerNorm → modulation → mlp_up (3072→12288) → GELU(tanh) → mlp_down (12288→3072);
``proj`` = a plain linear on a contiguous input (3072→3072: nothing to fuse into).

Prints ms per call (``triton.testing.do_bench`` median over distinct inputs) and, per variant, the device
kernels of one profiled call (``--kernels``), and checks each int8 variant against the float64 reference.

    python benchmarks/compile_split.py                 # CUDA
    python benchmarks/compile_split.py --dry-run       # CPU: traces with aot_eager, checks, no timing
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(*a):
    print(*a, flush=True)


def load_package():
    try:
        import convert_to_quant  # noqa: F401
    except ImportError:
        parent = os.path.dirname(REPO)
        link = os.path.join(parent, "convert_to_quant")
        if os.path.basename(REPO) != "convert_to_quant" and not os.path.exists(link):
            sys.exit("error: put the repository on PYTHONPATH as package convert_to_quant "
                     "(e.g. a symlink named convert_to_quant)")
        sys.path.insert(0, parent)
    from convert_to_quant import kernels
    from convert_to_quant.quant_core.formats import Int8Blockwise, Int8Tensorwise
    return kernels, Int8Tensorwise, Int8Blockwise


class SubBlocks(torch.nn.Module):
    def __init__(self, hidden, mlp, linear, make_w, dev):
        super().__init__()
        self.hidden, self.linear = hidden, linear
        g = torch.Generator().manual_seed(0)
        self.shift = (torch.randn(hidden, generator=g) * 0.1).to(dev, torch.bfloat16)
        self.scale = (torch.randn(hidden, generator=g) * 0.1).to(dev, torch.bfloat16)
        self.w = {name: make_w(n, k, g) for name, (n, k) in
                  {"qkv": (3 * hidden, hidden), "up": (mlp, hidden), "down": (hidden, mlp),
                   "proj": (hidden, hidden)}.items()}

    def modulated(self, x):
        return F.layer_norm(x, (self.hidden,)) * (1 + self.scale) + self.shift

    def qkv(self, x):
        return self.linear(self.modulated(x), self.w["qkv"])

    def mlp(self, x):
        return self.linear(F.gelu(self.linear(self.modulated(x), self.w["up"]), approximate="tanh"), self.w["down"])

    def proj(self, x):
        return self.linear(x, self.w["proj"])


def reference(blocks, part, x, deq):
    """float64 of the same sub-block with the dequantized weights."""
    xd = x.double()
    lin = lambda h, w: h @ deq(w).T  # noqa: E731
    mod = F.layer_norm(xd, (blocks.hidden,)) * (1 + blocks.scale.double()) + blocks.shift.double()
    if part == "qkv":
        return lin(mod, blocks.w["qkv"])
    if part == "mlp":
        return lin(F.gelu(lin(mod, blocks.w["up"]), approximate="tanh"), blocks.w["down"])
    return lin(xd, blocks.w["proj"])


def kernels_of(fn, x, top=8):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    agg = {}
    for e in prof.events():
        if e.device_type == DeviceType.CPU:
            continue
        n, t = agg.get(e.name, (0, 0.0))
        agg[e.name] = (n + 1, t + e.time_range.elapsed_us())
    return sorted(((k, n, t) for k, (n, t) in agg.items()), key=lambda r: -r[2])[:top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4608)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--mlp", type=int, default=12288)
    ap.add_argument("--format", choices=["row", "block"], default="row")
    ap.add_argument("--inputs", type=int, default=4, help="distinct inputs rotated through while timing")
    ap.add_argument("--kernels", action="store_true", help="print each variant's device kernels per call")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    kernels, Int8Tensorwise, Int8Blockwise = load_package()
    from convert_to_quant.kernels import dispatch
    if args.dry_run:
        args.tokens, args.hidden, args.mlp, args.inputs = 40, 64, 128, 1
        dev, backend, compile_backend = torch.device("cpu"), "triton", "aot_eager"
    else:
        if not torch.cuda.is_available():
            sys.exit("error: needs CUDA (or --dry-run)")
        dev, backend, compile_backend = torch.device("cuda"), None, "inductor"

    def make_int8(n, k, g):
        w = torch.randn(n, k, generator=g) * 0.02
        qw = (Int8Blockwise.quantize(w, Int8Blockwise.Params(128 if not args.dry_run else 32))
              if args.format == "block" else Int8Tensorwise.quantize(w, Int8Tensorwise.Params("row")))
        return _to(qw, dev)

    int8 = SubBlocks(args.hidden, args.mlp, lambda h, w: kernels.quantized_linear(h, w, backend=backend),
                     make_int8, dev)
    deq_bf16 = iter([w.dequantize().to(dev, torch.bfloat16) for w in int8.w.values()])
    bf16 = SubBlocks(args.hidden, args.mlp, lambda h, w: F.linear(h, w), lambda n, k, g: next(deq_bf16), dev)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, args.tokens, args.hidden, generator=g).to(dev, torch.bfloat16) for _ in range(args.inputs)]
    deq = lambda w: w.dequantize().double().to(dev)  # noqa: E731
    log(f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
        f"{args.tokens} tokens, hidden {args.hidden}, mlp {args.mlp}, int8 {args.format}")
    rows = []
    for part in ("qkv", "mlp", "proj"):
        times = {}
        ref = reference(int8, part, xs[0], deq)
        for name, mod, split in (("bf16", bf16, "1"), ("int8 opaque", int8, "0"), ("int8 split", int8, "1")):
            os.environ[dispatch.COMPILE_SPLIT_ENV] = split
            torch._dynamo.reset()
            fn = torch.compile(getattr(mod, part), backend=compile_backend, fullgraph=True)
            with torch.inference_mode():
                y = fn(xs[0])
                err = float((y.double() - ref).norm() / ref.norm())
                if name != "bf16" and not err < 3e-2:
                    sys.exit(f"error: {part} {name} is off the float64 reference: rel {err:.3g}")
                if args.dry_run:
                    times[name] = float("nan")
                    log(f"{part:>5} {name:>12}: rel err vs float64 {err:.2e}")
                    continue
                from triton.testing import do_bench
                i = [0]

                def call():
                    i[0] = (i[0] + 1) % len(xs)
                    return fn(xs[i[0]])

                times[name] = do_bench(call, warmup=50, rep=300, return_mode="median")
                log(f"{part:>5} {name:>12}: {times[name] * 1e3:8.1f} us   rel err vs float64 {err:.2e}")
                if args.kernels:
                    for k, n, t in kernels_of(fn, xs[0]):
                        log(f"      {t:8.1f} us {n}x  {k[:110]}")
        rows.append((part, times))
    os.environ.pop(dispatch.COMPILE_SPLIT_ENV, None)
    if not args.dry_run:
        log("\n| sub-block | bf16 us | int8 opaque us | int8 split us | bf16/opaque | bf16/split | split gain |")
        log("|---|---|---|---|---|---|---|")
        for part, t in rows:
            b, o, s = t["bf16"] * 1e3, t["int8 opaque"] * 1e3, t["int8 split"] * 1e3
            log(f"| {part} | {b:.1f} | {o:.1f} | {s:.1f} | {b / o:.3f}x | {b / s:.3f}x | {o / s:.3f}x |")
    return 0


def _to(qw, dev):
    from convert_to_quant.quant_core.formats import QuantizedWeight
    return QuantizedWeight(qw.format, qw.params, qw.qdata.to(dev), qw.scale.to(dev), qw.orig_dtype, qw.extra)


if __name__ == "__main__":
    sys.exit(main())
