"""Quality of every optimizer x format on a real model (all-MiniLM-L6-v2), measured from the written files.

    python benchmarks/quality.py [--num-iter 300] [--quick] [--json results.json] [--markdown table.md]

1. Captures calibration statistics on the built-in calibration sentences (417 real English sentences,
   ``quant_core/calibration_sentences.py``), with the same hooks the CLI uses.
2. Converts MiniLM once per (optimizer, format) with those statistics, exactly as
   ``convert_to_quant --calibration-data`` does, and reads from each run's quality report the stored
   weight SQNR (mean/min over layers) and the output SQNR on the calibration activations (mean).
3. Rebuilds the model from each written file and compares sentence embeddings with the float model on
   held-out sentences (``example.EVAL_SENTENCES`` plus ``HELDOUT_EXTRA`` below, none used for
   calibration): W8A16 (weights dequantized) and W8A8 (our runtime: per-token int8 activations).

Prints a Markdown table (and the machine) last. ``--quick``: a two-row smoke run (CI-sized).
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
}


def configs(quick: bool):
    if quick:
        return [("rtn", "row", {}), ("gptq", "row", {})]
    out = []
    for fmt in ("row", "tensor", "block", "convrot"):
        # every learned-rounding variant on the two core-loadable per-row formats, adamw elsewhere
        lr = ("original", "adamw", "radam") if fmt in ("row", "convrot") else ("adamw",)
        for opt in ("rtn", "gptq") + (("quip",) if fmt == "convrot" else ()) + lr:
            out.append((opt, fmt, {}))
    out += [("rtn", "int8_quip", {}), ("quip", "int8_quip", {})]
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
    options = {"num_iter": num_iter, **extra}
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
            "mean_output_sqnr_db": s.get("mean_output_sqnr_db"), "seconds": seconds, **ev}


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-iter", type=int, default=300, help="learned-rounding iterations")
    p.add_argument("--quick", action="store_true", help="two configurations, 32 calibration sentences")
    p.add_argument("--only", default=None, help="comma-separated optimizer names to run")
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
        for opt, fmt, extra in configs(a.quick):
            if a.only and opt not in a.only.split(","):
                continue
            r = run_one(model_file(), cal, d, opt, fmt, extra, 5 if a.quick else a.num_iter, heldout)
            rows.append(r)
            print(f"{r['label']:<40} wSQNR {r['mean_sqnr_db']:.2f}/{r['min_sqnr_db']:.2f}  "
                  f"out {r['mean_output_sqnr_db']:.2f}  W8A16 {r['w8a16_mean_cosine']:.6f}  "
                  f"W8A8 {r['w8a8_mean_cosine']:.6f}  {r['seconds']:.1f} s", flush=True)
    cpu = platform.processor() or platform.machine()
    note = (f"MiniLM-L6 (37 linear layers), calibration: {len(cal_sentences)} sentences; held-out: "
            f"{len(heldout)} sentences. Machine: {cpu}, {torch.get_num_threads()} CPU threads, torch "
            f"{torch.__version__}. Learned rounding: {5 if a.quick else a.num_iter} iterations.")
    table = markdown(rows, note)
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
