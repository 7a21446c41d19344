"""Learned rounding before/after issue 17 on the Flux-12B shapes, and its multi-device byte identity.

    python benchmarks/learned_rounding_speed.py            # H200: both parts, about 5 min
    python benchmarks/learned_rounding_speed.py --tiny     # CPU smoke run (every dimension / 32, old algorithm 100 it.)

Part 1 (per layer): for every distinct linear shape of Flux-dev's blocks (19 double blocks + 38 single,
hidden 3072, MLP 12288: the 304 layers of ``optimizer_speed.FLUX_SHAPES``) a Student-t(5)·0.02 weight and
a Hessian of generated heavy-tailed activations, quantized to per-row int8 by GPTQ, by learned rounding
as it was before issue 17 (``CTQ_LEARNED_ROUNDING=legacy``, ``--legacy-iter`` iterations, default the
seed's 1000) and by learned rounding now (default settings) -- ``--methods`` (default ``original``).
Seconds per layer (one warm call each, after one untimed warm-up call per optimizer on the first shape),
output SQNR on the layer's Hessian, iterations the new learner ran, and the projected whole-file layer
time = Σ seconds(shape) × layers of that shape.

Part 2 (``--devices``, default ``0,1`` on CUDA, ``cpu,cpu`` on CPU): a small synthetic model with
calibration statistics converted by the CLI with ``--optimizer original`` on one device and on the
listed devices: SHA-256 of both outputs must be equal (prints IDENTICAL / DIFFERENT), with both wall
times and GPTQ's for the ratio.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from optimizer_speed import FLUX_SHAPES, structured_hessian, student_t, sync  # noqa: E402


def _run(name, w, spec, stats, options, device, legacy):
    from convert_to_quant.quant_core.optimizers import LayerContext, get_optimizer, run_optimizer
    old = os.environ.get("CTQ_LEARNED_ROUNDING")
    if legacy:
        os.environ["CTQ_LEARNED_ROUNDING"] = "legacy"
    else:
        os.environ.pop("CTQ_LEARNED_ROUNDING", None)
    try:
        ctx = LayerContext(base="bench", device=device, stats=stats, options=dict(options), orig_dtype=torch.bfloat16)
        sync(device)
        t0 = time.perf_counter()
        res = run_optimizer(get_optimizer(name), w, spec, ctx)
        sync(device)
        return time.perf_counter() - t0, res.info
    finally:
        if old is None:
            os.environ.pop("CTQ_LEARNED_ROUNDING", None)
        else:
            os.environ["CTQ_LEARNED_ROUNDING"] = old


def part1(device, div, methods, legacy_iter, num_iter, extra=None):
    from convert_to_quant.quant_core.calibration import LayerStats
    from convert_to_quant.quant_core.formats import make_spec, resolve_fit
    cols = ["gptq"] + [f"{m} before" for m in methods] + [f"{m} after" for m in methods]
    rows, warmed = {}, False
    for (out, inn), count in FLUX_SHAPES.items():
        o, i = max(out // div, 8), max(inn // div, 8)
        g = torch.Generator(device=device).manual_seed(out + inn)
        w = student_t((o, i), gen=g, device=device)
        h = structured_hessian(i, device, seed=i)
        stats = LayerStats("bench", h * 1000.0, torch.ones(i, device=device), torch.zeros(i, device=device), 1000, 1000)
        spec, _ = resolve_fit(make_spec(), (o, i))
        runs = [("gptq", "gptq", {}, False)]
        runs += [(f"{m} before", m, {"num_iter": legacy_iter}, True) for m in methods]
        after = dict(extra or {}, **({} if num_iter is None else {"num_iter": num_iter}))
        runs += [(f"{m} after", m, after, False) for m in methods]
        if not warmed:  # lazy initialisations (cuBLAS, graph pools) out of the first timed call
            for _, name, opts, legacy in runs:
                _run(name, w, spec, stats, dict(opts, num_iter=min(opts.get("num_iter", 20), 20)) if name != "gptq"
                     else opts, device, legacy)
            warmed = True
        for col, name, opts, legacy in runs:
            sec, info = _run(name, w, spec, stats, opts, device, legacy)
            rows[(out, inn, col)] = (sec, info.get("output_sqnr_db"), info.get("iterations"))
            print(f"  {o}x{i} x{count} {col:<16} {sec:8.2f} s  output SQNR {info.get('output_sqnr_db') or 0:.2f} dB"
                  f"  iterations {info.get('iterations', '-')}"
                  + ("  phases: " + ", ".join(f"{k} {v:.3f}" for k, v in info["phase_s"].items())
                     if info.get("phase_s") else ""), flush=True)
        del w, h, stats
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = ["| layer (out x in) | layers | " + " | ".join(f"{c} s (dB)" for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for (out, inn), count in FLUX_SHAPES.items():
        lines.append(f"| {max(out // div, 8)}x{max(inn // div, 8)} | {count} | " + " | ".join(
            f"{rows[(out, inn, c)][0]:.2f} ({rows[(out, inn, c)][1] or 0:.2f})" for c in cols) + " |")
    tot = {c: sum(n * rows[(o, i, c)][0] for (o, i), n in FLUX_SHAPES.items()) for c in cols}
    lines.append(f"| **Flux-12B blocks, {sum(FLUX_SHAPES.values())} layers (projected layer time)** | | " +
                 " | ".join(f"**{tot[c] / 60:.2f} min**" for c in cols) + " |")
    for m in methods:
        lines.append(f"\n{m}: projected {tot[m + ' after'] / 60:.2f} min after vs {tot[m + ' before'] / 60:.2f} min "
                     f"before ({tot[m + ' before'] / max(tot[m + ' after'], 1e-9):.1f}x); "
                     f"{tot[m + ' after'] / max(tot['gptq'], 1e-9):.2f}x GPTQ's layer time")
    return "\n".join(lines)


def _sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def part2(device, devices, div):
    """A synthetic model of one double-block stream's shapes (/ div) with calibration statistics."""
    from convert_to_quant.quant_core.calibration import CalibrationData, LayerStats
    from convert_to_quant.quant_core.safetensors_io import save_file
    from optimizer_speed import ActivationModel
    d, m = 3072 // div, 12288 // div
    shapes = {"blocks.0.qkv": (3 * d, d), "blocks.0.proj": (d, d), "blocks.0.mlp0": (m, d), "blocks.0.mlp2": (d, m),
              "blocks.1.qkv": (3 * d, d), "blocks.1.proj": (d, d)}
    g = torch.Generator().manual_seed(0)
    weights, groups = {}, {}
    for name, (o, i) in shapes.items():
        weights[name + ".weight"] = student_t((o, i), gen=g).to(torch.bfloat16)
        am = ActivationModel(i, torch.device("cpu"), seed=i)
        x = am.residual(4 * i, g)
        groups[name] = LayerStats(name, x.T @ x, x.abs().amax(0), x.mean(0), x.shape[0], x.shape[0])
    # deterministic cuBLAS workspaces, as benchmarks/scale.py uses for its byte-identity rows
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONUNBUFFERED="1")
    exe = [sys.executable, "-m", "convert_to_quant"]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        src, cal = os.path.join(tmp, "model.safetensors"), os.path.join(tmp, "cal.safetensors")
        save_file(weights, src)
        CalibrationData({n: n for n in groups}, groups).save(cal)
        one = "cpu" if device.type == "cpu" else "cuda:0"
        res = {}
        for opt in ("gptq", "original"):
            for label, flags in (("1 device", ["--device", one]), (f"--devices {devices}", ["--devices", devices])):
                out = os.path.join(tmp, f"{opt}_{len(flags[1])}.safetensors")
                cmd = exe + ["-i", src, "-o", out, "--optimizer", opt, "--calibration-data", cal, "--overwrite",
                             "--no-default-skip"] + flags
                t0 = time.perf_counter()
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                sec = time.perf_counter() - t0
                if p.returncode != 0:
                    print(p.stdout[-2000:], p.stderr[-2000:])
                    raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode})")
                res[(opt, label)] = (sec, _sha(out))
                print(f"  {opt:<8} {label:<18} {sec:6.1f} s  sha256 {res[(opt, label)][1][:16]}", flush=True)
        for opt in ("gptq", "original"):
            a, b = res[(opt, "1 device")], res[(opt, f"--devices {devices}")]
            lines.append(f"{opt}: 1 device {a[0]:.1f} s, --devices {devices} {b[0]:.1f} s, output "
                         f"{'IDENTICAL' if a[1] == b[1] else 'DIFFERENT'} (sha256 {a[1][:16]} / {b[1][:16]})")
        r = res[("original", f"--devices {devices}")][0] / res[("gptq", f"--devices {devices}")][0]
        lines.append(f"learned rounding / GPTQ wall time with --devices {devices}: {r:.2f}x")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="every dimension / 32 (CPU smoke run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--methods", default="original", help="comma-separated: original,adamw,radam")
    p.add_argument("--legacy-iter", type=int, default=None,
                   help="iterations of the old algorithm (default the seed's 1000; 100 with --tiny)")
    p.add_argument("--num-iter", type=int, default=None, help="iterations of the new one (default: its default)")
    p.add_argument("--devices", default=None, help="part 2 devices (default 0,1 on CUDA, cpu,cpu on CPU)")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--skip-part2", action="store_true")
    p.add_argument("--options", default="",
                   help="more optimizer options for the new learner, e.g. polish_sweeps=1,early_stop_stall=20")
    p.add_argument("--phases", action="store_true",
                   help="print the new learner's seconds per phase (CTQ_PHASE_TIMES=1: a sync at each phase)")
    a = p.parse_args(argv)
    if a.phases:
        os.environ["CTQ_PHASE_TIMES"] = "1"
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    div = 32 if a.tiny else 1
    legacy_iter = a.legacy_iter or (100 if a.tiny else 1000)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {card}; torch {torch.__version__}; dims / {div}", flush=True)
    out = []
    t0 = time.perf_counter()
    if not a.skip_part1:
        print("part 1: seconds per layer, before (legacy) and after", flush=True)
        extra = {}
        for item in filter(None, (a.options or "").split(",")):
            key, _, val = item.partition("=")
            extra[key.strip()] = int(val) if val.strip().lstrip("-").isdigit() else val.strip()
        out.append(part1(device, div, a.methods.split(","), legacy_iter, a.num_iter, extra))
    if not a.skip_part2:
        devices = a.devices or ("0,1" if device.type == "cuda" else "cpu,cpu")
        print(f"part 2: byte identity, 1 device vs --devices {devices}", flush=True)
        out.append(part2(device, devices, 16 if a.tiny else 4))
    print()
    print(f"### Learned rounding before/after ({card}, dims / {div}; {time.perf_counter() - t0:.0f} s)\n")
    print("\n\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
