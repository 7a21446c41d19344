"""Peak RSS of a --low-memory conversion of a generated bf16 model, above the interpreter baseline.

    python benchmarks/memory.py --size-gb 1 --width 4096 [--format axis|block|convrot] [--optimizer gptq]
                                [--streaming]

Generates ``size-gb`` of bf16 linear weights (width x width layers, written one tensor at a time), then
in a fresh child process imports the library, records VmRSS (the baseline), converts with
``--low-memory`` semantics (``--streaming``: the default read-ahead / write-behind pipeline instead), and
reports VmHWM - baseline: the memory the conversion itself needed. With ``--optimizer gptq`` the bound to
compare with is one bf16 layer plus the optimizer's working set (``memory.estimate_layer_bytes``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(max(1, torch.get_num_threads()))
from convert_to_quant.quant_core.formats import make_spec
from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
from convert_to_quant.quant_core.plan import PlanOptions

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
src, out, fmt, optimizer, low = sys.argv[1:6]
spec = {"axis": make_spec(), "block": make_spec(scaling_mode="block"),
        "convrot": make_spec(convrot=True)}[fmt]
# warm up allocator / lazy imports on a tiny tensor so the baseline includes them
spec.cls.quantize(torch.randn(256, 256), spec.params)
base = status("VmRSS")
t0 = time.perf_counter()
res = convert_file(src, out, ConvertOptions(plan=PlanOptions(spec=spec), low_memory=low == "1", device="cpu",
                                           optimizer=optimizer))
dt = time.perf_counter() - t0
print(json.dumps({"baseline_bytes": base, "peak_bytes": status("VmHWM"), "seconds": dt,
                  "layers": res.report.summary["layers_quantized"]}))
"""


def generate(path: str, size_gb: float, width: int, seed: int = 0) -> int:
    from convert_to_quant.quant_core.safetensors_io import OutputEntry, StreamingWriter
    per = width * width * 2
    n = max(1, math.ceil(size_gb * 1e9 / per))
    entries = [OutputEntry(f"blocks.{i}.linear.weight", torch.bfloat16, (width, width)) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    with StreamingWriter(path, entries, {"generated": "benchmarks/memory.py"}, overwrite=True) as w:
        for e in entries:
            w.write(e.key, (torch.randn(width, width, generator=g) * 0.02).to(torch.bfloat16))
    return n * per


def measure(size_gb=1.0, width=4096, fmt="axis", workdir=None, optimizer="rtn", low_memory=True) -> dict:
    workdir = workdir or tempfile.mkdtemp(prefix="ctq-mem-")
    src = os.path.join(workdir, "big_bf16.safetensors")
    out = os.path.join(workdir, "big_int8.safetensors")
    nbytes = generate(src, size_gb, width)
    if os.path.exists(out):
        os.unlink(out)
    r = subprocess.run([sys.executable, "-c", CHILD, src, out, fmt, optimizer, "1" if low_memory else "0"],
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res.update(input_bytes=nbytes, width=width, format=fmt, optimizer=optimizer, low_memory=low_memory,
               above_baseline_bytes=res["peak_bytes"] - res["baseline_bytes"],
               largest_layer_bf16_bytes=width * width * 2)
    for p in (src, out):
        os.unlink(p)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--format", default="axis", choices=["axis", "block", "convrot"])
    ap.add_argument("--optimizer", default="rtn")
    ap.add_argument("--streaming", action="store_true", help="read-ahead / write-behind instead of --low-memory")
    a = ap.parse_args()
    r = measure(a.size_gb, a.width, a.format, optimizer=a.optimizer, low_memory=not a.streaming)
    print(f"input {r['input_bytes'] / 1e9:.2f} GB bf16 ({r['layers']} layers {a.width}x{a.width}), "
          f"format {a.format}, {a.optimizer}, {'streaming' if a.streaming else 'low-memory'}: "
          f"peak RSS {r['above_baseline_bytes'] / 1e6:.0f} MB above the "
          f"{r['baseline_bytes'] / 1e6:.0f} MB baseline "
          f"({r['above_baseline_bytes'] / r['largest_layer_bf16_bytes']:.1f}x the largest bf16 layer), "
          f"{r['seconds']:.1f} s = {r['input_bytes'] / 1e9 / r['seconds']:.2f} GB/s")


if __name__ == "__main__":
    main()
