"""Quality of every optimizer x format on a real model (all-MiniLM-L6-v2), measured from the written files.

    python benchmarks/quality.py [--extras] [--num-iter N] [--quick] [--json results.json] [--markdown table.md]

Default: the matrix of issue 17 -- RTN, GPTQ and every learned-rounding optimizer (original, adamw,
radam) on every 8-bit format they run on (int8 tensor-wise, per-row, block-wise, convrot per-row, and
float8_e4m3fn), each learned cell flagged where its output SQNR is below GPTQ's in the same format.
``--extras`` adds the other rows (QuIP, ``int8_quip``, SmoothQuant, bias correction).

1. Captures calibration statistics on the built-in calibration sentences (417 real English sentences,
   ``quant_core/calibration_sentences.py``), with the same hooks the CLI uses.
2. Converts MiniLM once per (optimizer, format) with those statistics, exactly as
   ``convert_to_quant --calibration-data`` does, and reads from each run's quality report the stored
   weight SQNR (mean/min over layers) and the output SQNR on the calibration activations (mean).
3. Rebuilds the model from each written file and compares sentence embeddings with the float model on
   held-out sentences (``example.EVAL_SENTENCES`` plus ``HELDOUT_EXTRA`` below, none used for
   calibration): W8A16 (weights dequantized) and W8A8 (our runtime: per-token int8 activations).

Prints the detail table (every configuration), then the matrix (output SQNR and seconds per cell, and
the layers where a learned optimizer ends below GPTQ), and the machine. ``--quick``: a two-row smoke run.
``--num-iter``: learned-rounding iterations (default: the optimizer's own default).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch

HELDOUT_EXTRA = [
    "A young boy is riding a red bicycle down a quiet country lane.",
    "The central bank kept interest rates unchanged for the third month.",
    "Please call me back when you have a free moment this afternoon.",
    "Several dolphins were seen swimming close to the shore at dawn.",
    "The new museum wing displays sculptures from ancient Greece.",
    "My computer freezes every time I open the video editor.",
    "Heavy traffic delayed the ambulance on its way to the hospital.",
    "The students cheered when the results of the competition were announced.",
    "Which vegetables grow best in a shady garden?",
    "The old mill by the river has been turned into a restaurant.",
    "A sudden hailstorm damaged cars parked along the avenue.",
    "The violin was made by hand more than two hundred years ago.",
    "Researchers are testing a battery that charges in five minutes.",
    "Grandma keeps her recipes in a worn leather notebook.",
    "The hikers set up their tent just before it started to rain.",
    "The council approved funding for a new public swimming pool.",
]

# (label, optimizer, format key, extra options)
FORMATS = {
    "row": dict(scaling_mode="axis"),
    "tensor": dict(scaling_mode="tensor"),
    "block": dict(scaling_mode="block"),
    "convrot": dict(scaling_mode="axis", convrot=True),  # group 256, 64 where 256 does not divide
    "int8_quip": dict(format="int8_quip"),
    "fp8": dict(format="fp8"),
}
MATRIX_FORMATS = ("tensor", "row", "block", "convrot", "fp8")
MATRIX_OPTIMIZERS = ("rtn", "gptq", "original", "adamw", "radam")
LEARNED = ("original", "adamw", "radam")


def configs(quick: bool, extras: bool = False):
    if quick:
        return [("rtn", "row", {}), ("gptq", "row", {})]
    out = [(opt, fmt, {}) for fmt in MATRIX_FORMATS for opt in MATRIX_OPTIMIZERS]
    if extras:
        out += [("quip", "convrot", {}), ("rtn", "int8_quip", {}), ("quip", "int8_quip", {})]
        for opt in ("rtn", "gptq", "adamw"):
            out.append((opt, "row", {"smoothquant": True, "smoothquant_alpha": 0.5}))
        out.append(("quip", "convrot", {"bias_correction": True}))
    return out


def spec_for(fmt: str):
    from convert_to_quant.quant_core.formats import make_spec
    kw = FORMATS[fmt]
    if "format" in kw:
        return make_spec(format=kw["format"])
    return make_spec(format="int8", scaling_mode=kw["scaling_mode"], convrot=kw.get("convrot", False))


def label(opt, fmt, extra):
    s = f"{opt} / {fmt}"
    if extra.get("smoothquant"):
        s = f"{opt} + SmoothQuant / int8_smoothquant"
    if extra.get("bias_correction"):
        s += " + bias corr."
    return s


def run_one(src, cal_path, out_dir, opt, fmt, extra, num_iter, sentences):
    from convert_to_quant.quant_core.example import evaluate_file
    from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
    from convert_to_quant.quant_core.plan import PlanOptions
    options = {**({"num_iter": num_iter} if num_iter else {}), **extra}
    out = os.path.join(out_dir, f"{opt}_{fmt}_{len(extra)}.safetensors")
    opts = ConvertOptions(plan=PlanOptions(spec=spec_for(fmt), presets=["auto"]), optimizer=opt,
                          optimizer_options=options, calibration_data=cal_path, overwrite=True, device="cpu")
    t0 = time.perf_counter()
    res = convert_file(src, out, opts)
    seconds = time.perf_counter() - t0
    s = res.report.summary
    ev = evaluate_file(out, sentences)
    os.unlink(out)
    return {"label": label(opt, fmt, extra), "optimizer": opt, "format": fmt, "extra": extra,
            "mean_sqnr_db": s.get("mean_sqnr_db"), "min_sqnr_db": s.get("min_sqnr_db"),
            "mean_output_sqnr_db": s.get("mean_output_sqnr_db"), "seconds": seconds,
            "layer_output_sqnr_db": {b: lq.output_sqnr_db for b, lq in res.report.layers.items()
                                     if lq.output_sqnr_db is not None}, **ev}


def markdown(rows, header_note):
    rtn_out = {(r["format"], bool(r["extra"].get("smoothquant"))): r["mean_output_sqnr_db"] for r in rows
               if r["optimizer"] == "rtn"}
    lines = [header_note, "",
             "| optimizer / format | weight SQNR mean / min (dB) | output SQNR mean (dB) | Δ vs RTN (dB) | "
             "W8A16 cosine mean / min | W8A8 cosine mean / min | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = rtn_out.get((r["format"], bool(r["extra"].get("smoothquant"))))
        delta = "" if r["optimizer"] == "rtn" or base is None else f"{r['mean_output_sqnr_db'] - base:+.2f}"
        lines.append(f"| {r['label']} | {r['mean_sqnr_db']:.2f} / {r['min_sqnr_db']:.2f} | "
                     f"{r['mean_output_sqnr_db']:.2f} | {delta} | {r['w8a16_mean_cosine']:.6f} / "
                     f"{r['w8a16_min_cosine']:.6f} | {r['w8a8_mean_cosine']:.6f} / {r['w8a8_min_cosine']:.6f} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def matrix(rows):
    """Output SQNR (mean over layers, dB) and seconds per optimizer x format; a learned cell below GPTQ's
    mean is marked **< GPTQ**, and every cell names the layers where it ends > 0.01 dB below GPTQ's."""
    cells = {(r["optimizer"], r["format"]): r for r in rows if not r["extra"]}
    fmts = [f for f in MATRIX_FORMATS if any((o, f) in cells for o in MATRIX_OPTIMIZERS)]
    lines = ["| optimizer | " + " | ".join(fmts) + " |", "|---|" + "---:|" * len(fmts)]
    flagged = []
    for o in MATRIX_OPTIMIZERS:
        if not any((o, f) in cells for f in fmts):
            continue
        out = []
        for f in fmts:
            r = cells.get((o, f))
            if r is None:
                out.append("")
                continue
            cell = f"{r['mean_output_sqnr_db']:.2f} dB, {r['seconds']:.1f} s"
            g = cells.get(("gptq", f))
            if o in LEARNED and g is not None:
                if r["mean_output_sqnr_db"] < g["mean_output_sqnr_db"]:
                    cell += " **< GPTQ**"
                    flagged.append(f"{o} / {f}: mean {r['mean_output_sqnr_db']:.2f} < GPTQ {g['mean_output_sqnr_db']:.2f}")
                gl, ll = g.get("layer_output_sqnr_db", {}), r.get("layer_output_sqnr_db", {})
                below = [b for b in ll if b in gl and ll[b] < gl[b] - 0.01]
                if below:
                    flagged.append(f"{o} / {f}: {len(below)} layer(s) below GPTQ by > 0.01 dB: " + ", ".join(
                        f"{b} ({ll[b]:.2f} < {gl[b]:.2f})" for b in below[:5]))
                cell += f" ({ll and sum(ll[b] - gl[b] for b in ll if b in gl) / len(ll):+.2f})"
            out.append(cell)
        lines.append(f"| {o} | " + " | ".join(out) + " |")
    lines.append("")
    lines.append("Learned cells: (mean per-layer gain over GPTQ in dB). Below GPTQ: " +
                 ("; ".join(flagged) if flagged else "none (no cell, no layer)"))
    return "\n".join(lines), flagged


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-iter", type=int, default=None,
                   help="learned-rounding iterations (default: the optimizer's own default)")
    p.add_argument("--extras", action="store_true", help="also QuIP, int8_quip, SmoothQuant, bias correction")
    p.add_argument("--quick", action="store_true", help="two configurations, 32 calibration sentences")
    p.add_argument("--only", default=None, help="comma-separated optimizer names to run")
    p.add_argument("--formats", default=None, help="comma-separated formats to run (" + ",".join(FORMATS) + ")")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from convert_to_quant.quant_core.example import (CALIBRATION_SENTENCES, EVAL_SENTENCES,
                                                     capture_minilm_calibration, model_file)
    heldout = list(EVAL_SENTENCES) + HELDOUT_EXTRA
    cal_sentences = CALIBRATION_SENTENCES[:32] if a.quick else CALIBRATION_SENTENCES
    if set(heldout) & set(CALIBRATION_SENTENCES):
        sys.exit("held-out sentences overlap the calibration sentences")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        cal = os.path.join(d, "calibration.safetensors")
        t0 = time.perf_counter()
        cap = capture_minilm_calibration(cal, cal_sentences)
        print(f"calibration: {len(cal_sentences)} sentences, {cap['layers']} layers, "
              f"{cap['max_tokens_per_layer']} tokens, {time.perf_counter() - t0:.1f} s", flush=True)
        for opt, fmt, extra in configs(a.quick, a.extras):
            if a.only and opt not in a.only.split(","):
                continue
            if a.formats and fmt not in a.formats.split(","):
                continue
            r = run_one(model_file(), cal, d, opt, fmt, extra, 5 if a.quick else a.num_iter, heldout)
            rows.append(r)
            print(f"{r['label']:<40} wSQNR {r['mean_sqnr_db']:.2f}/{r['min_sqnr_db']:.2f}  "
                  f"out {r['mean_output_sqnr_db']:.2f}  W8A16 {r['w8a16_mean_cosine']:.6f}  "
                  f"W8A8 {r['w8a8_mean_cosine']:.6f}  {r['seconds']:.1f} s", flush=True)
    cpu = platform.processor() or platform.machine()
    note = (f"MiniLM-L6 (37 linear layers), calibration: {len(cal_sentences)} sentences; held-out: "
            f"{len(heldout)} sentences. Machine: {cpu}, {torch.get_num_threads()} CPU threads, torch "
            f"{torch.__version__}. Learned rounding: "
            f"{5 if a.quick else (a.num_iter or 'default')} iterations.")
    table = markdown(rows, note)
    mtable, _ = matrix(rows)
    table += "\n\nOutput SQNR (mean over layers, calibration activations) and seconds per conversion:\n\n" + mtable
    print()
    print(table)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
