"""Memory of calibration capture on DiT-width layers: one pass vs the bounded multi-pass policy.

    python benchmarks/calibration_memory.py [--budget-mb 700] [--tokens 256] [--batches 4] [--device cpu]

Builds a model of real Flux-dev widths (one double-block stream: qkv 3072->9216, proj, mlp 3072->12288->3072;
one single block: linear1 3072->21504, linear2 15360->3072), runs ``capture_calibration`` in a fresh child
process once without a budget and once with ``--budget-mb``, and reports the peak accumulator bytes (what
the statistics occupy on the capture device), the process's peak RSS above its baseline (CPU runs) or the
peak CUDA memory (GPU runs), the number of passes, and checks that both files hold the same statistics.
Also prints the statistics size of the whole Flux-dev model and the passes a budget implies.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import torch
from convert_to_quant.quant_core.calibration import capture_calibration

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

class Stream(torch.nn.Module):
    def __init__(self, d=3072):
        super().__init__()
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.proj = torch.nn.Linear(d, d)
        self.mlp0 = torch.nn.Linear(d, 4 * d)
        self.mlp2 = torch.nn.Linear(4 * d, d)
        self.linear1 = torch.nn.Linear(d, 3 * d + 4 * d)
        self.linear2 = torch.nn.Linear(d + 4 * d, d)

    def forward(self, x):
        d = x.shape[-1]
        q, k, v = self.qkv(torch.nn.functional.layer_norm(x, (d,))).split(d, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 64, -1) @ v
        x = x + self.proj(a)
        x = x + self.mlp2(torch.nn.functional.gelu(self.mlp0(torch.nn.functional.layer_norm(x, (d,)))))
        h = self.linear1(torch.nn.functional.layer_norm(x, (d,)))
        qkv, mlp = h.split([3 * d, 4 * d], -1)
        q, k, v = qkv.split(d, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / 64, -1) @ v
        return x + self.linear2(torch.cat([a, torch.nn.functional.gelu(mlp)], -1))

out, budget, tokens, batches, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
model = Stream().to(device).eval()
for p in model.parameters():
    p.requires_grad_(False)
data = [torch.randn(1, tokens, 3072, device=device) for _ in range(batches)]
with torch.no_grad():
    model(data[0])  # warm up: allocator and kernels in the baseline
base = rss("VmRSS")
if device.startswith("cuda"):
    torch.cuda.reset_peak_memory_stats()
    base_cuda = torch.cuda.memory_allocated()
t0 = time.perf_counter()
s = capture_calibration(model, data, out, forward=lambda m, b: m(b), device=device,
                        budget_bytes=None if budget == "none" else int(budget))
s["seconds"] = time.perf_counter() - t0
s["rss_above_baseline"] = rss("VmHWM") - base
if device.startswith("cuda"):
    s["cuda_peak_above_baseline"] = torch.cuda.max_memory_allocated() - base_cuda
print(json.dumps(s))
"""

FLUX_GROUPS = (  # (input width, number of such input groups) in Flux-dev's blocks
    (3072, 19 * 2 * 3 + 38 * 1 + 1),  # per stream qkv / proj / mlp.0 inputs; single linear1; shared vec (mods)
    (12288, 19 * 2), (15360, 38))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-mb", type=float, default=700)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    budget = int(a.budget_mb * 1e6)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        for name, b in (("one pass", "none"), (f"budget {a.budget_mb:g} MB", str(budget))):
            out = os.path.join(d, name.replace(" ", "_") + ".safetensors")
            r = subprocess.run([sys.executable, "-c", CHILD, out, b, str(a.tokens), str(a.batches), a.device],
                               capture_output=True, text=True, check=True)
            rows[name] = json.loads(r.stdout.strip().splitlines()[-1])
            rows[name]["path"] = out
        from convert_to_quant.quant_core.safetensors_io import SafetensorsReader
        with SafetensorsReader(rows["one pass"]["path"]) as r1, \
                SafetensorsReader(rows[f"budget {a.budget_mb:g} MB"]["path"]) as r2:
            assert set(r1.keys()) == set(r2.keys())
            worst = 0.0
            for k in r1.keys():
                x, y = r1.get(k).double(), r2.get(k).double()
                worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp(min=1e-30)))
    print(f"device {a.device}, {a.batches} batches x {a.tokens} tokens; statistics identical across policies "
          f"(max relative difference {worst:.1e})\n")
    print("| policy | passes | peak accumulators (MB) | peak RSS above baseline (MB) | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, s in rows.items():
        extra = s.get("cuda_peak_above_baseline", s["rss_above_baseline"])
        print(f"| {name} | {s['passes']} | {s['peak_accumulator_bytes'] / 1e6:.0f} | {extra / 1e6:.0f} | "
              f"{s['seconds']:.1f} |")
    total = sum(w * w * 4 + w * 12 for w, n in FLUX_GROUPS for _ in range(n))
    print(f"\nFlux-dev (all block linears): {sum(n for _, n in FLUX_GROUPS)} input groups, "
          f"{total / 1e9:.1f} GB of fp32 statistics; with a 16 GB budget: "
          f"{-(-total // (16 * 10 ** 9))}+ passes, peak accumulators <= 16 GB, host memory <= one group "
          f"({15360 * 15360 * 4 / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
