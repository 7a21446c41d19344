"""Calibrated optimizers at DiT scale: seconds per layer, projected Flux-12B total, and the seed's
Flux double-block comparison -- in one command.

    python benchmarks/optimizer_speed.py              # full Flux sizes, on the GPU if there is one
    python benchmarks/optimizer_speed.py --small      # every dimension / 8: a CPU smoke run

Part 1 (speed): for every distinct linear shape of Flux-dev (double blocks: mod 18432x3072, qkv 9216x3072,
proj 3072x3072, mlp.0 12288x3072, mlp.2 3072x12288; single blocks: linear1 21504x3072, linear2 3072x15360,
modulation 9216x3072; out x in) a Student-t(5) x 0.02 weight and a Hessian from generated activations
(heavy-tailed, outlier channels, low-rank correlation) are quantized to per-row int8 by RTN, GPTQ,
learned rounding (adamw, ``--num-iter``) and QuIP (convrot 256). Seconds per layer (median of
``--repeats``) and the projected total for the 304 block linears of Flux-dev (11.8B parameters).

Part 2 (the seed's comparison): one Flux double block (img/txt x qkv, proj, mlp.0, mlp.2: 8 layers,
Student-t(5) x 0.02, bf16 file) converted through ``convert_file`` -- without calibration data
(weight-only objective) and with calibration statistics of *generated* activations that have the
structure of a double block's real inputs: a heavy-tailed residual stream with outlier channels and
low-rank token correlation, LayerNorm + modulation for qkv / mlp.0, softmax attention output for proj,
GELU(mlp.0) for mlp.2 (synthetic, not from a real Flux checkpoint). Scored from the written file: stored
weight SQNR (mean over the 8 layers), output SQNR on fresh held-out activations, seconds. The seed's own
numbers (H200, from the issue) are printed beside ours.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch

FLUX_SHAPES = {  # (out, in): number of such layers in Flux-dev's double + single blocks
    (18432, 3072): 38, (9216, 3072): 76, (3072, 3072): 38, (12288, 3072): 38, (3072, 12288): 38,
    (21504, 3072): 38, (3072, 15360): 38,
}
REQUIRED = [(3072, 3072), (12288, 3072), (3072, 12288)]
SEED = {  # the seed's code on one Flux double block, H200 (issue 3)
    "rtn": "33.8 dB, 5 s", "learned rounding": "33.8 dB (identical to RTN)", "quip": "33.6 dB, 94 s",
    "gptq": "crashed (quantile() > 16.7M elements)"}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def student_t(shape, df=5, scale=0.02, gen=None, device="cpu"):
    z = torch.randn(shape, generator=gen, device=device)
    chi2 = torch.zeros(shape, device=device)
    for _ in range(df):
        chi2 += torch.randn(shape, generator=gen, device=device).pow(2)
    return z / torch.sqrt(chi2 / df) * scale


class ActivationModel:
    """Generated activations with the structure of a DiT block's inputs (see the module docstring)."""

    def __init__(self, width, device, seed=0, rank=64, outlier_frac=0.005):
        g = torch.Generator(device=device).manual_seed(seed)
        self.g, self.device, self.width = g, device, width
        self.chan_scale = torch.exp(0.5 * torch.randn(width, generator=g, device=device))
        n_out = max(1, int(outlier_frac * width))
        self.outliers = torch.randperm(width, generator=g, device=device)[:n_out]
        self.chan_scale[self.outliers] *= 30.0
        self.mix = torch.randn(rank, width, generator=g, device=device) / math.sqrt(rank)
        self.mod_scale = 0.3 * torch.randn(width, generator=g, device=device)
        self.mod_shift = 0.3 * torch.randn(width, generator=g, device=device)

    def residual(self, tokens, gen):
        z = torch.randn(tokens, self.mix.shape[0], generator=gen, device=self.device)
        noise = student_t((tokens, self.width), df=4, scale=1.0, gen=gen, device=self.device)
        return (3.0 * z @ self.mix + noise) * self.chan_scale

    def normed(self, x):
        h = torch.nn.functional.layer_norm(x, (x.shape[-1],))
        return h * (1 + self.mod_scale) + self.mod_shift


def block_inputs(am, w, tokens, heads, gen):
    """Inputs of qkv, proj, mlp.0, mlp.2 for one stream of a double block (float32)."""
    x = am.residual(tokens, gen)
    h = am.normed(x)
    qkv = h @ w["qkv"].T
    d = am.width
    q, k, v = qkv.split(d, dim=1)
    hd = d // heads
    q, k, v = (t.reshape(tokens, heads, hd).transpose(0, 1) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1) @ v
    attn_out = att.transpose(0, 1).reshape(tokens, d)
    h2 = am.normed(x + attn_out @ w["proj"].T)
    mid = torch.nn.functional.gelu(h2 @ w["mlp0"].T, approximate="tanh")
    return {"qkv": h, "proj": attn_out, "mlp0": h2, "mlp2": mid}


# ------------------------------------------------------------------------------------------------
# part 1: speed per layer
# ------------------------------------------------------------------------------------------------
def structured_hessian(inn, device, seed, tokens=2048):
    am = ActivationModel(inn, device, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    h = torch.zeros(inn, inn, device=device)
    n = 0
    for _ in range(2):
        x = am.residual(tokens, g)
        h.addmm_(x.T, x)
        n += tokens
    return h / n


def time_layer(name, w, spec, stats, options, device, repeats):
    from convert_to_quant.quant_core.optimizers import LayerContext, get_optimizer, run_optimizer
    times, res = [], None
    for _ in range(repeats):
        ctx = LayerContext(base="bench", device=device, stats=stats, options=dict(options), orig_dtype=torch.bfloat16)
        sync(device)
        t0 = time.perf_counter()
        res = run_optimizer(get_optimizer(name), w, spec, ctx)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), res


def part1(device, div, num_iter, repeats, shapes, optimizers):
    from convert_to_quant.quant_core.calibration import LayerStats
    from convert_to_quant.quant_core.formats import make_spec, resolve_fit
    rows = {}
    for (out, inn) in shapes:
        o, i = out // div, inn // div
        g = torch.Generator(device=device).manual_seed(out + inn)
        w = student_t((o, i), gen=g, device=device)
        h = structured_hessian(i, device, seed=i)
        stats = LayerStats("bench", h * 1000.0, torch.ones(i, device=device), torch.zeros(i, device=device), 1000, 1000)
        for name in optimizers:
            spec, _ = resolve_fit(make_spec(convrot=True) if name == "quip" else make_spec(), (o, i))
            opts = {"num_iter": num_iter} if name in ("original", "adamw", "radam") else {}
            sec, res = time_layer(name, w, spec, stats, opts, device, repeats if name != "adamw" else 1)
            rows[(out, inn, name)] = (sec, res.info.get("output_sqnr_db"))
            print(f"  {o}x{i} {name:<8} {sec:8.2f} s  output SQNR {res.info.get('output_sqnr_db') or 0:.2f} dB",
                  flush=True)
        del w, h, stats
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------
# part 2: one Flux double block through convert_file
# ------------------------------------------------------------------------------------------------
def make_block(div, device, tokens_img, tokens_txt, samples, seed=0):
    d, m = 3072 // div, 12288 // div
    heads = 24  # Flux: 24 heads of 128 (of 16 with --small)
    g = torch.Generator(device=device).manual_seed(seed)
    weights, stats_cal, h_held = {}, {}, {}
    for stream, tokens in (("img", tokens_img), ("txt", tokens_txt)):
        w = {"qkv": student_t((3 * d, d), gen=g, device=device), "proj": student_t((d, d), gen=g, device=device),
             "mlp0": student_t((m, d), gen=g, device=device), "mlp2": student_t((d, m), gen=g, device=device)}
        am = ActivationModel(d, device, seed=seed + (1 if stream == "img" else 2))
        for split, n_samples in (("cal", samples), ("held", max(1, samples // 2))):
            gg = torch.Generator(device=device).manual_seed(seed + (10 if split == "cal" else 20) + len(stream))
            acc = {}
            for _ in range(n_samples):
                for k, x in block_inputs(am, w, tokens, heads, gg).items():
                    a = acc.setdefault(k, [torch.zeros(x.shape[1], x.shape[1], device=device),
                                           torch.zeros(x.shape[1], device=device),
                                           torch.zeros(x.shape[1], device=device, dtype=torch.float64), 0])
                    a[0].addmm_(x.T, x)
                    a[1] = torch.maximum(a[1], x.abs().amax(0))
                    a[2] += x.sum(0, dtype=torch.float64)
                    a[3] += x.shape[0]
            for k, (h, amax, s, n) in acc.items():
                name = f"double_blocks.0.{stream}_{'attn.' if k in ('qkv', 'proj') else 'mlp.'}" + \
                       {"qkv": "qkv", "proj": "proj", "mlp0": "0", "mlp2": "2"}[k]
                if split == "cal":
                    stats_cal[name] = (h.cpu(), amax.cpu(), (s / n).float().cpu(), n)
                else:
                    h_held[name] = (h / n).cpu()
        for k, t in w.items():
            name = f"double_blocks.0.{stream}_{'attn.' if k in ('qkv', 'proj') else 'mlp.'}" + \
                   {"qkv": "qkv", "proj": "proj", "mlp0": "0", "mlp2": "2"}[k]
            weights[name + ".weight"] = t.to(torch.bfloat16).cpu()
    return weights, stats_cal, h_held


def part2(device, div, num_iter, tokens_img, tokens_txt, samples, optimizers=None):
    from convert_to_quant.quant_core.calibration import CalibrationData, LayerStats
    from convert_to_quant.quant_core.formats import make_spec
    from convert_to_quant.quant_core.loading import load_quantized_file
    from convert_to_quant.quant_core.metrics import sqnr_db
    from convert_to_quant.quant_core.optimizers.objective import quad_error
    from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
    from convert_to_quant.quant_core.plan import PlanOptions
    from convert_to_quant.quant_core.safetensors_io import save_file

    t0 = time.perf_counter()
    weights, stats_cal, h_held = make_block(div, device, tokens_img, tokens_txt, samples)
    print(f"  generated the block and its activations in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "flux_double_block.safetensors")
        save_file(weights, src)
        cal = os.path.join(d, "calibration.safetensors")
        groups = {n: LayerStats(n, h, a, mu, n_tok, n_tok) for n, (h, a, mu, n_tok) in stats_cal.items()}
        CalibrationData({n: n for n in groups}, groups).save(cal)
        runs = [("rtn", "per-row", make_spec(), False), ("gptq", "per-row", make_spec(), False),
                ("adamw", "per-row", make_spec(), False), ("quip", "convrot 256", make_spec(convrot=True), False),
                ("rtn", "per-row", make_spec(), True), ("gptq", "per-row", make_spec(), True),
                ("adamw", "per-row", make_spec(), True), ("rtn", "convrot 256", make_spec(convrot=True), True),
                ("quip", "convrot 256", make_spec(convrot=True), True),
                ("quip", "int8_quip", make_spec(format="int8_quip"), True)]
        for opt, fmt, spec, with_cal in runs:
            if optimizers and opt not in optimizers:
                continue
            out = os.path.join(d, f"out_{opt}.safetensors")
            opts = ConvertOptions(plan=PlanOptions(spec=spec, default_skip=False), optimizer=opt,
                                  optimizer_options={"num_iter": num_iter}, overwrite=True,
                                  calibration_data=cal if with_cal else None,
                                  device=str(device), quality_threshold=None)
            sync(device)
            t1 = time.perf_counter()
            res = convert_file(src, out, opts)
            sync(device)
            sec = time.perf_counter() - t1
            sd, _ = load_quantized_file(out)
            w_sq, o_sq = [], []
            for k, w in weights.items():
                base = k[: -len(".weight")]
                wf = w.float()
                w_sq.append(sqnr_db(wf, sd[k]))
                h = h_held[base]
                o_sq.append(10 * math.log10(quad_error(wf, h) / quad_error(sd[k].float() - wf, h)))
            rows.append({"optimizer": opt, "format": fmt, "calibration": with_cal,
                         "stored_sqnr_db": sum(w_sq) / len(w_sq), "heldout_output_sqnr_db": sum(o_sq) / len(o_sq),
                         "report_output_sqnr_db": res.report.summary.get("mean_output_sqnr_db"), "seconds": sec})
            r = rows[-1]
            print(f"  {opt:<6} {fmt:<12} {'calibrated' if with_cal else 'weight-only':<11} stored {r['stored_sqnr_db']:.2f} dB"
                  f"  held-out output {r['heldout_output_sqnr_db']:.2f} dB  {sec:.1f} s", flush=True)
            os.unlink(out)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="every dimension / 8 (CPU smoke run)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--num-iter", type=int, default=None, help="learned-rounding iterations (default 1000; 100 --small)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", choices=["flux", "required"], default="flux",
                   help="all 7 distinct Flux-dev shapes (for the projection) or only the 3 of the issue")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--skip-part2", action="store_true")
    p.add_argument("--part2-optimizers", default=None, help="comma-separated subset for part 2 (e.g. rtn,gptq,quip)")
    p.add_argument("--tokens-img", type=int, default=None, help="part 2 image tokens per sample (default 4096)")
    p.add_argument("--tokens-txt", type=int, default=None, help="part 2 text tokens per sample (default 512)")
    p.add_argument("--samples", type=int, default=4, help="part 2 calibration samples (held out: half)")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    div = 8 if a.small else 1
    num_iter = a.num_iter or (100 if a.small else 1000)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {card}; torch {torch.__version__}; dims / {div}; learned rounding {num_iter} iterations",
          flush=True)
    shapes = list(FLUX_SHAPES) if a.shapes == "flux" else REQUIRED
    lines = []
    if not a.skip_part1:
        print("part 1: seconds per layer", flush=True)
        opt_names = ["rtn", "gptq", "quip", "adamw"]
        rows = part1(device, div, num_iter, a.repeats, shapes, opt_names)
        lines += [f"### Seconds per layer ({card}, dims / {div}, learned rounding {num_iter} iterations)", "",
                  "| layer (out x in) | " + " | ".join(opt_names) + " |", "|---|" + "---:|" * len(opt_names)]
        for (out, inn) in shapes:
            lines.append(f"| {out // div}x{inn // div} | " +
                         " | ".join(f"{rows[(out, inn, n)][0]:.2f}" for n in opt_names) + " |")
        if a.shapes == "flux":
            tot = {n: sum(c * rows[(o, i, n)][0] for (o, i), c in FLUX_SHAPES.items()) for n in opt_names}
            lines.append(f"| **Flux-dev blocks, 304 layers (projected)** | " +
                         " | ".join(f"**{tot[n] / 60:.1f} min**" for n in opt_names) + " |")
        lines.append("")
    if not a.skip_part2:
        print("part 2: one Flux double block through convert_file", flush=True)
        tok_img = a.tokens_img or (512 if a.small else 4096)
        tok_txt = a.tokens_txt or (64 if a.small else 512)
        samples = a.samples
        rows2 = part2(device, div, num_iter, tok_img, tok_txt, samples,
                      a.part2_optimizers.split(",") if a.part2_optimizers else None)
        lines += [f"### One Flux double block, 8 layers ({card}, dims / {div}); activations generated "
                  f"({samples} x {tok_img} img + {tok_txt} txt tokens calibration, half as many held out)", "",
                  "| optimizer | format | objective | stored weight SQNR (dB) | held-out output SQNR (dB) | "
                  "seconds | seed (H200) |", "|---|---|---|---:|---:|---:|---|"]
        for r in rows2:
            seed = SEED.get("learned rounding" if r["optimizer"] == "adamw" else r["optimizer"], "") \
                if not r["calibration"] and r["format"] in ("per-row", "convrot 256") else ""
            lines.append(f"| {r['optimizer']} | {r['format']} | {'calibration' if r['calibration'] else 'weight-only'}"
                         f" | {r['stored_sqnr_db']:.2f} | {r['heldout_output_sqnr_db']:.2f} | {r['seconds']:.1f} | "
                         f"{seed} |")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
