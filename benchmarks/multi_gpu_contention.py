"""Why are two GPTQ ranks busier in sum than one GPU alone? CPU threads per rank, and plain concurrency.

    python benchmarks/multi_gpu_contention.py                 # threads: ~4 min on two H200s
    python benchmarks/multi_gpu_contention.py --concurrent    # two independent one-GPU runs at once

Generates the 5.11 GB Flux subset of ``scale.py`` (4 double + 8 single blocks) and converts it with
``--optimizer gptq --flux`` through the CLI: on one GPU (default threads, and OMP_NUM_THREADS=16) and with
``--devices 0,1`` (default threads, 16, 4), ``--rounds`` times in turn. Prints wall and conversion
seconds and, for two GPUs, each rank's busy seconds and units taken (the report's ``summary.ranks``).
``--concurrent`` instead runs, per round, one one-GPU conversion alone and then two independent
one-GPU conversions at the same time (GPU 0 and GPU 1, no process group, no shared file): if each of
the two is slower than the one alone, the slowdown comes from sharing the host, not from the
multi-GPU machinery.
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


def start(work: str, src: str, tag: str, args, threads=None, visible=None):
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    report = os.path.join(work, f"report_{tag}.json")
    p = subprocess.Popen([sys.executable, "-m", "convert_to_quant", "-i", src, "-o",
                          os.path.join(work, f"o_{tag}.safetensors"), "--overwrite", "--optimizer", "gptq", "--flux",
                          "--report-quality", report, "--verbose", "MINIMAL"] + args, env=env,
                         stdout=subprocess.DEVNULL, stderr=open(report + ".log", "w"))  # files: never a full pipe
    return p, report, time.perf_counter()


def finish(name: str, started):
    p, report, t = started
    p.wait()
    wall = time.perf_counter() - t
    if p.returncode:
        print(f"{name:30} FAILED: {open(report + '.log').read().strip().splitlines()[-1:]}")
        return
    s = json.load(open(report))["summary"]
    ranks = "; ".join(f"rank {x['rank']} busy {x['busy_s']:.1f} s, {x.get('units')} units" for x in s.get("ranks") or [])
    print(f"{name:30} wall {wall:6.1f} s  conv {s['seconds']:6.1f} s  {ranks}", flush=True)


def run(work: str, src: str, name: str, args, threads=None):
    finish(name, start(work, src, "x", args, threads))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrent", action="store_true", help="one-GPU runs alone vs two at once")
    a = ap.parse_args()
    if torch.cuda.device_count() < 2:
        print("needs two CUDA GPUs")
        return 0
    work = tempfile.mkdtemp(prefix="ctq-threads-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        src = os.path.join(work, "subset.safetensors")
        write_model(src, flux_shapes(only_double=set(range(4)), only_single=set(range(8))), torch.device("cuda"))
        print(f"device: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, {os.cpu_count()} CPUs")
        for i in range(a.rounds if a.concurrent else 0):
            run(work, src, f"1 GPU alone #{i}", ["--device", "cuda:0"])
            both = [start(work, src, f"c{g}", ["--device", "cuda:0"], visible=str(g)) for g in (0, 1)]
            for g, st in enumerate(both):
                finish(f"1 GPU, 2 at once: GPU {g} #{i}", st)
        for i in range(0 if a.concurrent else a.rounds):
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
