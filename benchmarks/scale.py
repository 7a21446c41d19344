"""Scale benchmark: a Flux-12B-shaped bf16 model through every memory mode, RTN vs GPTQ vs QuIP, and
the multi-GPU run against the one-GPU run (byte identity and speed-up). One command, a table last.

    python benchmarks/scale.py                 # GPU machine (2+ GPUs for the multi-GPU rows), < 9 min
    python benchmarks/scale.py --small         # CPU smoke run (hidden 256), < 1 min (45 s budget)

The model has Flux.1-dev's key names and shapes (19 double blocks, 38 single blocks, hidden 3072, MLP
12288, 11.9B parameters, 23.8 GB bf16; random N(0, 0.02) weights), written tensor by tensor, straight
from the generator to the file. Files go to ``--workdir`` (default: /dev/shm when it has room -- the
throughput target is "from the page cache" -- else the system temp folder), never next to $OUT.

Rows (each a fresh child process, so peak RSS and VRAM belong to that run alone):

* RTN of the whole model, default pipeline (read-ahead + write-behind) and ``--low-memory``:
  wall / conversion seconds, GB/s of bf16 input, peak RSS above the interpreter baseline, peak VRAM.
* GPTQ and QuIP (weight-only objective) on a *subset* of whole blocks with the full model's ratio of
  double to single blocks (default 4 + 8 of 19 + 38), projected to the full model by the cost model of
  ``quant_core.distributed.layer_cost`` (the table says "projected"); QuIP also ``--quip-checkpointed``.
* GPTQ on the same subset (``--gptq-model full``: the whole model, measured) with ``--devices 0,1``
  (CPU: ``--devices cpu,cpu``), once per ``--schedule`` (dynamic, static): SHA-256 of the output equal
  to the one-device run, the speed-up (target >= 1.7x on 2 GPUs) and each rank's busy time; then the
  one-GPU run again with the column sweep launched op by op (``CTQ_CUDA_GRAPHS=0``): same SHA-256?
* Streaming modes (off / balanced / aggressive) for GPTQ on a smaller subset (1 + 2 blocks): where
  Hessians and layers go, peak VRAM against the policy's own estimate, and what it costs in time.
* ``--bf16-compute`` off / auto / on for convrot RTN on the subset: time and weight SQNR.

Phases run in priority order inside ``--budget-s`` (default 500 s); a phase that would not fit in what
is left is reported as skipped, never silently dropped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def flux_shapes(hidden=3072, mlp=12288, double=19, single=38, txt=4096, vec=768, head_dim=128,
                only_double=None, only_single=None) -> List[Tuple[str, Tuple[int, ...]]]:
    """Flux.1-dev's state dict: (key, shape) in its file order. ``only_*``: keep those block indices."""
    h, m = hidden, mlp
    keys: List[Tuple[str, Tuple[int, ...]]] = []

    def lin(name, out, inn, bias=True):
        keys.append((f"{name}.weight", (out, inn)))
        if bias:
            keys.append((f"{name}.bias", (out,)))

    lin("img_in", h, 64)
    for e, inn in (("time_in", 256), ("vector_in", vec), ("guidance_in", 256)):
        lin(f"{e}.in_layer", h, inn)
        lin(f"{e}.out_layer", h, h)
    lin("txt_in", h, txt)
    for i in range(double):
        if only_double is not None and i not in only_double:
            continue
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            lin(p + "mod.lin", 6 * h, h)
            lin(p + "attn.qkv", 3 * h, h)
            keys.append((p + "attn.norm.query_norm.scale", (head_dim,)))
            keys.append((p + "attn.norm.key_norm.scale", (head_dim,)))
            lin(p + "attn.proj", h, h)
            lin(p + "mlp.0", m, h)
            lin(p + "mlp.2", h, m)
    for i in range(single):
        if only_single is not None and i not in only_single:
            continue
        p = f"single_blocks.{i}."
        lin(p + "linear1", 3 * h + m, h)
        lin(p + "linear2", h, h + m)
        keys.append((p + "norm.query_norm.scale", (head_dim,)))
        keys.append((p + "norm.key_norm.scale", (head_dim,)))
        lin(p + "modulation.lin", 3 * h, h)
    lin("final_layer.linear", 64, h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return keys


def write_model(path: str, keys, device: torch.device, seed: int = 0) -> int:
    """Generate and write a bf16 safetensors file one tensor at a time (random on ``device``, which is
    fast on a GPU). Returns the data bytes. Header and offsets come from the project's writer."""
    from convert_to_quant.quant_core.safetensors_io import OutputEntry, build_header
    entries = [OutputEntry(k, torch.bfloat16, s) for k, s in keys]
    raw, offsets, total = build_header(entries, {"generated": "benchmarks/scale.py (random Flux-shaped)"})
    start = 8 + len(raw)
    g = torch.Generator(device=device).manual_seed(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, start + total)
        os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
        for e in entries:
            if e.key.endswith(".scale"):
                t = torch.ones(e.shape, dtype=torch.bfloat16)
            else:
                std = 0.02 if e.key.endswith(".weight") else 0.01
                t = (torch.randn(e.shape, generator=g, device=device) * std).to(torch.bfloat16).cpu()
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            pos = 0
            while pos < len(view):
                pos += os.pwrite(fd, view[pos:], start + offsets[e.key] + pos)
    finally:
        os.close(fd)
    return total


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# one conversion in a fresh process
# ------------------------------------------------------------------------------------------------
CHILD = r"""
import json, os, sys, time
import torch
from convert_to_quant.quant_core import cli
from convert_to_quant.quant_core.memory import proc_status_bytes
from convert_to_quant.quant_core.pipeline import convert_file
argv = json.loads(sys.argv[1])
parser = cli.build_parser()
args = parser.parse_args(argv)
cli.validate_args(args, parser)
opts = cli.options_from_args(args)
cuda = torch.cuda.is_available() and not opts.device.startswith("cpu")
if cuda:
    torch.zeros(1, device="cuda")  # CUDA context in the baseline
    torch.cuda.reset_peak_memory_stats()
base = proc_status_bytes("VmRSS")
logs = []
t0 = time.perf_counter()
res = convert_file(args.input, args.output, opts, log=logs.append)
dt = time.perf_counter() - t0
s = res.report.summary
print(json.dumps({"seconds": dt, "baseline_rss": base, "peak_rss": proc_status_bytes("VmHWM"),
                  "peak_vram": torch.cuda.max_memory_allocated() if cuda else None,
                  "peak_vram_reserved": torch.cuda.max_memory_reserved() if cuda else None,
                  "mean_sqnr_db": s.get("mean_sqnr_db"), "layers": s.get("layers_quantized"),
                  "notes": [n for l in res.report.layers.values() for n in l.notes
                            if n.startswith(("placed on", "out of memory"))][:200],
                  "memory_log": [m for m in logs if m.startswith("memory:")]}))
"""


class Bench:
    def __init__(self, args):
        self.args = args
        self.t_start = time.perf_counter()
        self.rows: List[Dict] = []
        self.facts: Dict[str, object] = {}
        self.durations: Dict[str, float] = {}

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t_start)

    def env(self, threads: Optional[int] = None, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        e = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONUNBUFFERED="1", **(extra or {}))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(k, None)
        if threads:
            e["OMP_NUM_THREADS"] = str(threads)
        return e

    def fits(self, name: str, estimate_s: float) -> bool:
        if estimate_s > self.left() - 5:
            self.rows.append({"run": name, "skipped": f"time budget ({estimate_s:.0f} s needed, "
                                                       f"{max(self.left(), 0):.0f} s left)"})
            return False
        return True

    def run(self, name: str, cmd: List[str], threads=None, extra_env=None):
        """Run one row's process inside the remaining budget: (completed process, wall seconds), or None
        after recording the row as skipped (budget hit, or the process failed: its last stderr line)."""
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=self.env(threads, extra_env),
                               timeout=max(self.left(), 10))
        except subprocess.TimeoutExpired:
            self.rows.append({"run": name, "skipped": "hit the time budget while running"})
            return None
        if r.returncode != 0:
            self.rows.append({"run": name, "skipped": "FAILED: " + (r.stderr.strip().splitlines() or ["?"])[-1][:150]})
            return None
        return r, time.perf_counter() - t0

    def child(self, name: str, src: str, out: str, flags: List[str], input_bytes: int, threads=None,
              keep=False, extra_env=None, **row) -> Optional[Dict]:
        argv = ["-i", src, "-o", out, "--overwrite"] + flags
        ran = self.run(name, [sys.executable, "-c", CHILD, json.dumps(argv)], threads, extra_env)
        if ran is None:
            return None
        r, wall = ran
        d = json.loads(r.stdout.strip().splitlines()[-1])
        d.update(run=name, wall=wall, gbps=input_bytes / 1e9 / d["seconds"], flags=" ".join(flags), **row)
        if keep:  # hashed for the identity checks; the file itself is not needed after that
            d["sha256"] = file_sha256(out)
        if os.path.exists(out) and not self.args.keep:
            os.unlink(out)
        self.rows.append(d)
        return d

    def multi(self, name: str, src: str, out: str, flags: List[str], devices: str, input_bytes: int,
              threads=None, **row) -> Optional[Dict]:
        report = out[:-len(".safetensors")] + "_report.json"
        cmd = [sys.executable, "-m", "convert_to_quant", "-i", src, "-o", out, "--overwrite", "--devices", devices,
               "--report-quality", report, "--verbose", "MINIMAL"] + flags
        ran = self.run(name, cmd, threads)
        if ran is None:
            return None
        _, wall = ran
        s = json.load(open(report))["summary"]
        d = {"run": name, "wall": wall, "seconds": s["seconds"], "gbps": input_bytes / 1e9 / s["seconds"],
             "mean_sqnr_db": s.get("mean_sqnr_db"), "layers": s.get("layers_quantized"),
             "sha256": file_sha256(out), "flags": " ".join(flags) + f" --devices {devices}",
             "ranks": s.get("ranks"), **row}
        if not self.args.keep:
            os.unlink(out)
        self.rows.append(d)
        return d


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def quantized_cost(keys, optimizer: str) -> float:
    from convert_to_quant.quant_core.distributed import layer_cost
    skip = ("img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")  # the --flux preset
    return sum(layer_cost(s, optimizer) for k, s in keys
               if k.endswith(".weight") and len(s) == 2 and not k.startswith(skip))


def placement_estimate(keys, optimizer: str, mode: str) -> float:
    """Largest estimated working set the policy leaves on the GPU in ``mode`` (GiB)."""
    from convert_to_quant.quant_core.memory import estimate_layer_bytes, place_layer, policy_from_options
    pol = policy_from_options({"streaming_mode": mode}, torch.device("cuda:0"), free_vram_bytes=80 << 30)
    worst = 0
    for k, s in keys:
        if not k.endswith(".weight") or len(s) != 2:
            continue
        pl = place_layer(s, optimizer, pol)
        if pl.device.type == "cuda":
            worst = max(worst, estimate_layer_bytes(s, optimizer).total(pl.row_segments, pl.hessian_device is None))
    return worst / 2 ** 30


def fs_type(path: str) -> str:
    """The filesystem under ``path`` (tmpfs: the page cache is the storage; else fsync hits a disk)."""
    best, kind = "", "?"
    try:
        real = os.path.realpath(path)
        for line in open("/proc/mounts"):
            parts = line.split()
            if len(parts) > 2 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def pick_workdir(need_bytes: int, asked: Optional[str]) -> str:
    if asked:
        os.makedirs(asked, exist_ok=True)
        return tempfile.mkdtemp(prefix="ctq-scale-", dir=asked)
    for base in ("/dev/shm", tempfile.gettempdir()):
        try:
            if os.path.isdir(base) and shutil.disk_usage(base).free > need_bytes * 1.1:
                return tempfile.mkdtemp(prefix="ctq-scale-", dir=base)
        except OSError:
            continue
    return tempfile.mkdtemp(prefix="ctq-scale-")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU smoke run: hidden 256, 3+6 blocks, 2 CPU ranks")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="time budget (default 500 s, --small 55 s)")
    ap.add_argument("--subset", default=None, help="double,single blocks for GPTQ/QuIP (default 4,8; --small 1,2)")
    ap.add_argument("--gpus", type=int, default=None, help="GPUs for the multi-GPU rows (default: all, max 2)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--gptq-model", choices=("subset", "full"), default="subset",
                    help="model for the GPTQ one- vs multi-GPU rows (full: the whole 12B model, measured, not "
                         "projected; the eager-sweep row only if the budget allows)")
    ap.add_argument("--phases", default="rtn,gptq,multi,quip,bf16,modes",
                    help="comma-separated subset of rtn,gptq,multi,quip,bf16,modes (default: all)")
    a = ap.parse_args()
    phases = set(a.phases.split(","))
    unknown = phases - {"rtn", "gptq", "multi", "quip", "bf16", "modes"}
    if unknown:
        ap.error(f"unknown phase(s): {', '.join(sorted(unknown))}")
    cuda = torch.cuda.is_available() and not a.small
    a.budget_s = a.budget_s or (45.0 if a.small else 500.0)
    b = Bench(a)
    if a.small:
        dims = dict(hidden=256, mlp=1024, double=3, single=6, txt=256, vec=128, head_dim=64)
        sub = tuple(int(x) for x in (a.subset or "1,2").split(","))
        mode_sub = (1, 1)
    else:
        dims = {}
        sub = tuple(int(x) for x in (a.subset or "4,8").split(","))
        mode_sub = (1, 2)
    full_keys = flux_shapes(**dims)
    sub_keys = flux_shapes(**dims, only_double=set(range(sub[0])), only_single=set(range(sub[1])))
    mode_keys = flux_shapes(**dims, only_double=set(range(mode_sub[0])), only_single=set(range(mode_sub[1])))
    nbytes = lambda ks: sum(2 * math.prod(s) for _, s in ks)  # noqa: E731
    full_b, sub_b, mode_b = nbytes(full_keys), nbytes(sub_keys), nbytes(mode_keys)
    # inputs + the largest output (RTN, removed after its row) + the kept GPTQ outputs (1 GPU, eager, multi)
    gfull = a.gptq_model == "full"
    work = pick_workdir(int(full_b * (2.2 if gfull else 1.6) + sub_b * 1.6 + mode_b), a.workdir)
    gen_dev = torch.device("cuda") if cuda else torch.device("cpu")
    n_gpu = torch.cuda.device_count() if cuda else 0
    n_multi = min(a.gpus or n_gpu, 2) if cuda else 2
    devices = ",".join(str(i) for i in range(n_multi)) if cuda else "cpu,cpu"
    threads = 1 if not cuda else None  # CPU ranks and their reference run with one thread each
    base_flags = ["--flux"] + (["--device", "cpu"] if not cuda else [])
    b.facts.update(device=(torch.cuda.get_device_name(0) + f" x{n_gpu}") if cuda else "CPU",
                   torch=torch.__version__, cpus=os.cpu_count(), workdir=f"{work} ({fs_type(work)})",
                   params_full=sum(math.prod(s) for _, s in full_keys))
    try:
        t0 = time.perf_counter()
        src = os.path.join(work, "flux_bf16.safetensors")
        sub_src = os.path.join(work, "flux_subset_bf16.safetensors")
        mode_src = os.path.join(work, "flux_modes_bf16.safetensors")
        if "rtn" in phases or gfull:
            write_model(src, full_keys, gen_dev)
        write_model(sub_src, sub_keys, gen_dev)
        write_model(mode_src, mode_keys, gen_dev)
        b.facts["generate_s"] = time.perf_counter() - t0
        out = lambda n: os.path.join(work, n + ".safetensors")  # noqa: E731
        ratio = quantized_cost(full_keys, "gptq") / quantized_cost(sub_keys, "gptq")
        b.facts["projection_ratio"] = ratio

        # 1. RTN, whole model
        rtn = None
        if "rtn" in phases and b.fits("rtn full", 60 if cuda else 10):
            rtn = b.child("RTN full, default", src, out("rtn"), base_flags, full_b, threads=threads, model="full")
        if "rtn" in phases and b.fits("rtn full --low-memory", 1.5 * rtn["wall"] if rtn else 90):
            b.child("RTN full, --low-memory", src, out("rtn_low"), base_flags + ["--low-memory"], full_b,
                    threads=threads, model="full")
        # 2. GPTQ (subset, or --gptq-model full): one device vs several (identity + speed-up)
        g_src, g_b, g_name = (src, full_b, "full") if gfull else (sub_src, sub_b, "subset")
        g_proj = lambda sec: None if gfull else sec * ratio  # noqa: E731 ("full s*": subset rows only)
        g1 = None
        if "gptq" in phases and b.fits(f"gptq {g_name} 1 device", (150 if gfull else 60) if cuda else 15):
            g1 = b.child(f"GPTQ {g_name}, 1 " + ("GPU" if cuda else "proc"), g_src, out("gptq1"),
                         base_flags + ["--optimizer", "gptq"], g_b, threads=threads, keep=True, model=g_name,
                         projected_s=None)
            if g1:
                g1["projected_s"] = g_proj(g1["seconds"])
        g2 = {}  # per schedule: the default dynamic work queue, and the static assignment for comparison
        for schedule in ("dynamic", "static") if g1 and "multi" in phases else ():
            if b.fits(f"gptq {g_name} multi {schedule}", 0.8 * g1["wall"]):
                r = b.multi(f"GPTQ {g_name}, {n_multi} " + ("GPUs" if cuda else "procs") + f", {schedule}", g_src,
                            out("gptq2_" + schedule), ["--optimizer", "gptq", "--schedule", schedule] + base_flags,
                            devices, g_b, threads=threads, model=g_name)
                if r:
                    r["projected_s"] = g_proj(r["seconds"])
                    g2[schedule] = r
        g0 = None  # the same run with the column sweep launched op by op (before CUDA graphs)
        if g1 and cuda and "gptq" in phases and b.fits(f"gptq {g_name} eager", 3.0 * g1["wall"]):
            g0 = b.child(f"GPTQ {g_name}, 1 GPU, eager sweep", g_src, out("gptq1_eager"),
                         base_flags + ["--optimizer", "gptq"], g_b, keep=True, model=g_name,
                         extra_env={"CTQ_CUDA_GRAPHS": "0"})
            if g0:
                g0["projected_s"] = g_proj(g0["seconds"])
                b.facts["graphs"] = dict(identical=g0["sha256"] == g1["sha256"], speedup=g0["seconds"] / g1["seconds"])
        # without the GPTQ subset row: its wall time measured on an H200 (25 s) / a 2-core CPU (--small, 3 s)
        gptq_guess = 25.0 if cuda else 3.0
        g_sub_wall = g1["wall"] if g1 and not gfull else gptq_guess
        # 3. QuIP subset (+ checkpointed LDLQ)
        q1 = None
        if "quip" in phases and b.fits("quip subset", 1.3 * g_sub_wall):
            q1 = b.child("QuIP subset, 1 " + ("GPU" if cuda else "proc"), sub_src, out("quip"),
                         base_flags + ["--optimizer", "quip"], sub_b, threads=threads, model="subset")
            if q1:
                q1["projected_s"] = q1["seconds"] * ratio
            if q1 and b.fits("quip checkpointed", 1.2 * q1["wall"]):
                b.child("QuIP subset, --quip-checkpointed", sub_src, out("quip_ckpt"),
                        base_flags + ["--optimizer", "quip", "--quip-checkpointed"]
                        + ([] if cuda else ["--quip-checkpoint-threshold", "1024"]), sub_b, threads=threads,
                        model="subset")
        # 4. bf16 compute, convrot RTN on the subset (threshold 0: every layer, also the small ones)
        for bf in ("off", "auto", "on") if "bf16" in phases else ():
            if b.fits(f"bf16 {bf}", 30 if cuda else 8):
                b.child(f"RTN convrot subset, bf16 {bf}", sub_src, out("bf16_" + bf),
                        base_flags + ["--convrot", "--bf16-compute", bf, "--bf16-threshold", "0",
                                      "--streaming-mode", "off"], sub_b, threads=threads, model="subset")
        # 5. streaming modes, GPTQ on the small subset; QuIP's checkpointed LDLQ before the slowest mode
        for mode in (("off", "balanced", "aggressive") if cuda else ("off",)) if "modes" in phases else ():
            est = placement_estimate(mode_keys, "gptq", mode) if cuda else None
            # measured on an H200: off 10 s, balanced 58 s, aggressive 96 s (the last two without CUDA graphs)
            guess = ({"off": 15, "balanced": 65, "aggressive": 105}[mode] if cuda
                     else {"off": 0.25, "balanced": 0.6, "aggressive": 1.5}[mode] * g_sub_wall)
            if b.fits(f"gptq modes {mode}", guess):
                b.child(f"GPTQ modes-subset, {mode}", mode_src, out("mode_" + mode),
                        base_flags + ["--optimizer", "gptq", "--streaming-mode", mode], mode_b, threads=threads,
                        model="modes", estimate_gib=est)
        for schedule, r in g2.items():
            b.facts.setdefault("multi", {})[schedule] = dict(
                identical=g1["sha256"] == r["sha256"], speedup_conv=g1["seconds"] / r["seconds"],
                speedup_wall=g1["wall"] / r["wall"])
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(b, full_b, sub_b, sub, mode_sub, n_multi, cuda)


def report(b: Bench, full_b, sub_b, sub, mode_sub, n_multi, cuda):
    f = b.facts
    gib = lambda x: "-" if x is None else f"{x / 2 ** 30:.2f}"  # noqa: E731
    print(f"\ndevice: {f['device']}, torch {f['torch']}, {f['cpus']} CPUs; files in {f['workdir']}")
    print(f"model: Flux-shaped, {f['params_full'] / 1e9:.2f}B parameters, {full_b / 1e9:.2f} GB bf16; subset "
          f"{sub[0]}+{sub[1]} blocks = {sub_b / 1e9:.2f} GB (projection x{f.get('projection_ratio', 0):.2f} by "
          f"layer cost); modes subset {mode_sub[0]}+{mode_sub[1]} blocks; generated in {f.get('generate_s', 0):.1f} s")
    hdr = (f"{'run':38} {'wall s':>7} {'conv s':>7} {'GB/s':>6} {'RSS+ GiB':>8} {'VRAM GiB':>8} {'est GiB':>7} "
           f"{'SQNR dB':>7} {'full s':>7}  sha256")
    print(hdr)
    print("-" * len(hdr))
    for r in b.rows:
        if "skipped" in r:
            print(f"{r['run']:38} skipped: {r['skipped']}")
            continue
        rss = None if r.get("peak_rss") is None else r["peak_rss"] - r["baseline_rss"]
        est = r.get("estimate_gib")
        proj = r.get("projected_s")
        print(f"{r['run']:38} {r['wall']:7.1f} {r['seconds']:7.1f} {r['gbps']:6.2f} {gib(rss):>8} "
              f"{gib(r.get('peak_vram')):>8} {'-' if est is None else f'{est:.2f}':>7} "
              f"{'-' if r.get('mean_sqnr_db') is None else format(r['mean_sqnr_db'], '.2f'):>7} "
              f"{'-' if proj is None else format(proj, '.0f') + '*':>7}  {r.get('sha256', '-')[:12]}")
    print("RSS+ = peak RSS above the child's baseline after imports; est = the policy's largest estimated "
          "GPU working set; full s* = projected to the whole model from the subset (not measured)")
    for r in b.rows:
        for m in r.get("memory_log", [])[:1]:
            print(f"  {r['run']}: {m}")
        notes = r.get("notes") or []
        if notes:
            print(f"  {r['run']}: {len(notes)} layers placed/retried, e.g. {notes[0]}")
        for t in r.get("ranks") or []:  # multi-rank rows: where each rank's time went
            print(f"  {r['run']}: rank {t['rank']}: {t['tensors']} tensors"
                  + (f" ({t['units']} units)" if "units" in t else "") + f", busy {t['busy_s']:.1f} s, "
                  f"done at {t['done_s']:.1f} s" + (f", received by rank 0 at {t['received_s']:.1f} s"
                                                    if "received_s" in t else ""))
    rtn = next((r for r in b.rows if r["run"] == "RTN full, default" and "skipped" not in r), None)
    if rtn:
        print(f"RTN throughput: {rtn['gbps']:.2f} GB/s of bf16 input ({rtn['gbps'] / 1.0:.2f}x the 1 GB/s target)")
    if "graphs" in f:
        print(f"GPTQ column sweep from CUDA graphs vs eager (1 GPU): output "
              f"{'BYTE-IDENTICAL' if f['graphs']['identical'] else 'DIFFERENT'}; {f['graphs']['speedup']:.2f}x "
              f"conversion time")
    for schedule, m in (f.get("multi") or {}).items():
        print(f"multi-device GPTQ ({n_multi} {'GPUs' if cuda else 'CPU processes'}, {schedule} schedule): output "
              f"{'BYTE-IDENTICAL' if m['identical'] else 'DIFFERENT'} to the one-device run (sha256); speed-up "
              f"{m['speedup_conv']:.2f}x conversion time, {m['speedup_wall']:.2f}x wall incl. process start"
              + (" (target 1.7x)" if cuda else " (CPU smoke run: processes share 2 cores, no speed-up expected)"))
    print(f"total {time.perf_counter() - b.t_start:.0f} s (budget {b.args.budget_s:.0f} s)")


if __name__ == "__main__":
    main()
