"""Per-call speed and accuracy of the runtime formats beside each other, as the loader runs them.

For a few token counts at K = N = 3072 (Flux-wide): bf16 ``F.linear``; int8 with per-token activation
scales (``kernels.prepare_linear``, the loader's call); int8 with a static activation scale (a file's
``<layer>.input_scale``, CLI ``--input_scale``); FP8 (``float8_e4m3fn`` with a per-tensor scale:
``torch._scaled_mm`` on sm89+). Every variant is checked against float64 first (relative L2 error
printed); times are synchronised single calls (``per_call.measure``: CUDA events around each call).

    python benchmarks/runtime_formats.py            # CUDA
    python benchmarks/runtime_formats.py --dry-run  # CPU smoke test (tiny shapes)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from per_call import log, measure, report_failures  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,256,4096")
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--calls", type=int, default=150)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        log("needs a CUDA GPU (or --dry-run)")
        return 2
    import convert_to_quant.kernels as K
    from convert_to_quant.quant_core.formats import QuantizedWeight, get_format, spec_from_choice
    dev = torch.device("cpu" if args.dry_run else "cuda")
    width = 64 if args.dry_run else args.width
    tokens = [3, 40] if args.dry_run else [int(t) for t in args.tokens.split(",")]
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(width, width, device=dev, generator=g) * width ** -0.5
    bias = (torch.randn(width, device=dev, generator=g) * 0.1).to(torch.bfloat16)
    int8 = spec_from_choice("int8")
    fp8 = spec_from_choice("fp8")
    q_int8 = get_format(int8.format).quantize(w, int8.params, torch.bfloat16)
    q_fp8 = get_format(fp8.format).quantize(w, fp8.params, torch.bfloat16)
    failures = []
    log(f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    for m in tokens:
        x = torch.randn(m, width, device=dev, generator=g).to(torch.bfloat16)
        # the static scale a calibration run would store: abs-max of these activations / 127
        s_in = (x.float().abs().amax() / 127).reshape(())
        q_static = QuantizedWeight(q_int8.format, q_int8.params, q_int8.qdata, q_int8.scale, q_int8.orig_dtype,
                                   {**q_int8.extra, "input_scale": s_in})
        run = K.prepare_linear(q_int8, dev)
        variants = {
            "bf16": lambda i: F.linear(x, w.to(torch.bfloat16), bias),
            "int8 per-token": lambda i: run(x, bias),
            "int8 static scale": lambda i: K.quantized_linear(x, q_static, bias),
            "fp8": lambda i: K.quantized_linear(x, q_fp8, bias),
        }
        ref = x.double() @ w.double().t() + bias.double()
        res = {}
        for name, fn in variants.items():
            out = fn(0).double()
            err = ((out - ref).norm() / ref.norm()).item()
            if not err < 5e-2:
                failures.append(f"M={m} {name}: rel err {err:.2e}")
            sync, cpu, _ = measure(fn, args.calls, dev, graph=False)
            res[name] = (sync, cpu, err)
        b = res["bf16"][0]
        log(f"\nM = {m}, K = N = {width}")
        for name, (sync, cpu, err) in res.items():
            log(f"  {name:<18} {sync:9.1f} us per call ({b / sync:5.2f}x bf16), host {cpu:7.1f} us, "
                f"rel err vs float64 {err:.2e}")
    return report_failures(failures)


if __name__ == "__main__":
    sys.exit(main())
