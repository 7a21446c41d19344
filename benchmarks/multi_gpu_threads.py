"""Does the 2-GPU GPTQ run depend on CPU threads per rank? One GPU vs two, with OMP_NUM_THREADS unset, 16, 4.

    python benchmarks/multi_gpu_threads.py            # needs 2 GPUs; ~4 min on two H200s

Generates the 5.11 GB Flux subset of ``scale.py`` (4 double + 8 single blocks) and converts it with
``--optimizer gptq --flux`` through the CLI: on one GPU (default threads, and OMP_NUM_THREADS=16) and with
``--devices 0,1`` (default threads, 16, 4), ``--rounds`` times in turn. Prints wall and conversion
seconds and, for two GPUs, each rank's busy seconds and units taken (the report's ``summary.ranks``).
Written to test one explanation of why two ranks are busier in sum than one GPU alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import flux_shapes, write_model  # noqa: E402


def run(work: str, src: str, name: str, args, threads=None):
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    report = os.path.join(work, "report.json")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "convert_to_quant", "-i", src, "-o", os.path.join(work, "o.safetensors"),
                        "--overwrite", "--optimizer", "gptq", "--flux", "--report-quality", report,
                        "--verbose", "MINIMAL"] + args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        print(f"{name:30} FAILED: {r.stderr.strip().splitlines()[-1:]}")
        return
    s = json.load(open(report))["summary"]
    ranks = "; ".join(f"rank {x['rank']} busy {x['busy_s']:.1f} s, {x.get('units')} units" for x in s.get("ranks") or [])
    print(f"{name:30} wall {wall:6.1f} s  conv {s['seconds']:6.1f} s  {ranks}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if torch.cuda.device_count() < 2:
        print("needs two CUDA GPUs")
        return 0
    work = tempfile.mkdtemp(prefix="ctq-threads-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        src = os.path.join(work, "subset.safetensors")
        write_model(src, flux_shapes(only_double=set(range(4)), only_single=set(range(8))), torch.device("cuda"))
        print(f"device: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, {os.cpu_count()} CPUs")
        for i in range(a.rounds):
            run(work, src, f"1 GPU, default threads #{i}", ["--device", "cuda:0"])
            run(work, src, f"2 GPUs, default threads #{i}", ["--devices", "0,1"])
            run(work, src, f"2 GPUs, OMP_NUM_THREADS=16 #{i}", ["--devices", "0,1"], 16)
            run(work, src, f"2 GPUs, OMP_NUM_THREADS=4 #{i}", ["--devices", "0,1"], 4)
            run(work, src, f"1 GPU, OMP_NUM_THREADS=16 #{i}", ["--device", "cuda:0"], 16)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
