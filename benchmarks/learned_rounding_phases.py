"""Where learned rounding's gain comes from, layer by layer, on real MiniLM weights and activations.

    python benchmarks/learned_rounding_phases.py [--sentences 64] [--num-iter 100,1000] [--layers N]

For each linear layer (the first ``--layers``), output-SQNR (dB, on the calibration Hessian) of:

* ``rtn``            round-to-nearest;
* ``gptq``           one GPTQ sweep (what ``--rounding-init gptq`` starts from);
* ``near/learn``     learned rounding from the plain weight (``--rounding-init nearest``), no polish:
                     the learning alone, AdaRound-style;
* ``gptq/learn``     learned rounding from GPTQ's target, no polish: does learning beat its start?
* ``gptq/polish``    GPTQ's start + coordinate-descent polish only (``--num_iter 0``);
* ``default``        the shipped default (GPTQ start, learning, polish of both candidates).

The last line counts the layers where the learning phase found a better hard rounding than its start.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sentences", type=int, default=64, help="calibration sentences")
    p.add_argument("--num-iter", default="100,1000", help="comma-separated learned-rounding iterations")
    p.add_argument("--layers", type=int, default=12, help="how many linear layers (model order)")
    p.add_argument("--method", default="adamw", choices=["original", "adamw", "radam"])
    a = p.parse_args(argv)
    from convert_to_quant.quant_core.calibration import load_calibration
    from convert_to_quant.quant_core.example import CALIBRATION_SENTENCES, capture_minilm_calibration, model_file
    from convert_to_quant.quant_core.formats import make_spec
    from convert_to_quant.quant_core.optimizers import LayerContext, get_optimizer, run_optimizer
    from convert_to_quant.quant_core.safetensors_io import SafetensorsReader

    iters = [int(x) for x in a.num_iter.split(",")]
    spec = make_spec()
    with tempfile.TemporaryDirectory() as d:
        cal = os.path.join(d, "cal.safetensors")
        capture_minilm_calibration(cal, CALIBRATION_SENTENCES[: a.sentences])
        data = load_calibration(cal)
        with SafetensorsReader(model_file()) as r:
            bases = [k[: -len(".weight")] for k in r.keys() if k.endswith(".weight") and len(r.info(k).shape) == 2
                     and data.for_layer(k[: -len(".weight")]) is not None][: a.layers]
            weights = {b: r.get(b + ".weight").float() for b in bases}

        def out_db(name, base, **o):
            ctx = LayerContext(base=base, stats=data.for_layer(base), options=o, orig_dtype=torch.float32)
            res = run_optimizer(get_optimizer(name), weights[base], spec, ctx)
            return res.info

        cols = ["rtn", "gptq", "gptq/polish"]
        for n in iters:
            cols += [f"near/learn {n}", f"gptq/learn {n}", f"default {n}"]
        print(f"MiniLM, {a.sentences} calibration sentences, per-row int8, method {a.method}; torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads. Output SQNR (dB) on the calibration "
              "Hessian; seconds per configuration summed over layers at the end.\n")
        print("| layer | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        wins = {n: 0 for n in iters}
        secs = {c: 0.0 for c in cols}
        for base in bases:
            vals = {}
            for c in cols:
                t0 = time.perf_counter()
                if c == "rtn":
                    info = out_db("rtn", base)
                elif c == "gptq":
                    info = out_db("gptq", base)
                elif c == "gptq/polish":
                    info = out_db(a.method, base, num_iter=0)
                else:
                    kind, n = c.split(" ")
                    n = int(n)
                    if kind == "near/learn":
                        info = out_db(a.method, base, num_iter=n, rounding_init="nearest", polish_sweeps=0)
                    elif kind == "gptq/learn":
                        info = out_db(a.method, base, num_iter=n, polish_sweeps=0)
                        if info.get("objective_after", 1) < info.get("objective_init", 0) * (1 - 1e-9):
                            wins[n] += 1
                    else:
                        info = out_db(a.method, base, num_iter=n)
                secs[c] += time.perf_counter() - t0
                vals[c] = info.get("output_sqnr_db")
                if vals[c] is None:  # rtn reports no output SQNR: compute it the same way
                    from convert_to_quant.quant_core.optimizers.objective import output_sqnr_db
                    qw = run_optimizer(get_optimizer("rtn"), weights[base], spec,
                                       LayerContext(base=base, stats=None, options={}, orig_dtype=torch.float32)).qw
                    vals[c] = output_sqnr_db(weights[base], qw.dequantize(), data.for_layer(base).hessian_mean())
            print(f"| {base.replace('encoder.layer.', 'L')} | " + " | ".join(f"{vals[c]:.2f}" for c in cols) + " |",
                  flush=True)
        print("| seconds | " + " | ".join(f"{secs[c]:.1f}" for c in cols) + " |")
        print()
        for n in iters:
            print(f"{n} iterations: the learning phase beat its GPTQ start on {wins[n]} of {len(bases)} layers")
        data.close()


if __name__ == "__main__":
    main()
