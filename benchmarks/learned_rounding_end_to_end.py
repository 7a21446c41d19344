"""Why learned rounding's per-layer gain moves the example's sentence cosine so little (issue 17).

    python benchmarks/learned_rounding_end_to_end.py [--optimizers gptq,original] [--top 8]

On real MiniLM weights and the example's real calibration activations (the 417 built-in sentences), each
optimizer quantizes every linear layer (per-row int8, in process, exactly the optimizer the CLI runs).
Then, against the float model:

* the end-to-end W8A16 sentence cosine on the example's 8 evaluation sentences and on 24 held-out
  sentences (those 8 + ``quality.HELDOUT_EXTRA``), none of them in the calibration set;
* the mean per-layer output SQNR on the calibration activations and on held-out activations (the 24
  sentences' own statistics): how much of the calibration gain generalizes;
* a one-layer ablation: ``1 − cos`` with only that layer quantized (all others float), for the
  ``--top`` layers that contribute most, and the sum over all layers (≈ the total when errors add);
* the first optimizer's model with its one / two most harmful layers left in float.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", default="gptq,original")
    p.add_argument("--top", type=int, default=8)
    a = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quality import HELDOUT_EXTRA
    import convert_to_quant.quant_core.example as ex
    from convert_to_quant.quant_core.calibration import load_calibration
    from convert_to_quant.quant_core.formats import make_spec
    from convert_to_quant.quant_core.optimizers import LayerContext, get_optimizer, quantize_layer
    from convert_to_quant.quant_core.optimizers.objective import output_sqnr_db
    from convert_to_quant.quant_core.safetensors_io import SafetensorsReader

    held = list(ex.EVAL_SENTENCES) + HELDOUT_EXTRA
    spec = make_spec(scaling_mode="axis")
    with tempfile.TemporaryDirectory() as d:
        cal, hcal = os.path.join(d, "cal.safetensors"), os.path.join(d, "held.safetensors")
        ex.capture_minilm_calibration(cal, ex.CALIBRATION_SENTENCES)
        saved, ex.EVAL_SENTENCES = ex.EVAL_SENTENCES, []  # the held-out statistics come from held-out text
        try:
            ex.capture_minilm_calibration(hcal, held)
        finally:
            ex.EVAL_SENTENCES = saved
        data, hdata = load_calibration(cal), load_calibration(hcal)
        with SafetensorsReader(ex.model_file()) as r:
            bases = [k[:-7] for k in r.keys() if k.endswith(".weight") and len(r.info(k).shape) == 2
                     and data.for_layer(k[:-7]) is not None]
            W = {b: r.get(b + ".weight").float() for b in bases}
        ref_model, tok = ex.load_model()
        ref = ex.embed(ref_model, tok, held)

        def one_minus_cos(wq):
            m = copy.deepcopy(ref_model)
            sd = m.state_dict()
            with torch.no_grad():
                for b, w in wq.items():
                    sd[b + ".weight"].copy_(w)
            c = ex.cosines(ref, ex.embed(m, tok, held))
            return 1 - sum(c[:8]) / 8, 1 - sum(c) / len(c)

        print(f"MiniLM-L6, per-row int8, {len(ex.CALIBRATION_SENTENCES)} calibration sentences; torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads\n")
        print("| optimizer | layer seconds | W8A16 cos, 8 eval sentences | 24 held-out | output SQNR cal / held-out "
              "(dB) | Σ one-layer 1−cos (8) |")
        print("|---|---:|---:|---:|---:|---:|")
        models, contrib = {}, {}
        for name in a.optimizers.split(","):
            t0 = time.perf_counter()
            wq = {}
            for b in bases:
                ctx = LayerContext(base=b, stats=data.for_layer(b), options={}, orig_dtype=torch.float32)
                wq[b] = quantize_layer(get_optimizer(name), W[b], spec, ctx).qw.dequantize().float()
            secs = time.perf_counter() - t0
            c8, c24 = one_minus_cos(wq)
            cal_db = sum(output_sqnr_db(W[b], wq[b], data.for_layer(b).hessian_mean()) for b in bases) / len(bases)
            held_db = sum(output_sqnr_db(W[b], wq[b], hdata.for_layer(b).hessian_mean()) for b in bases) / len(bases)
            contrib[name] = {b: one_minus_cos({b: wq[b]}) for b in bases}
            models[name] = wq
            s8 = sum(v[0] for v in contrib[name].values())
            print(f"| {name} | {secs:.1f} | {1 - c8:.6f} | {1 - c24:.6f} | {cal_db:.2f} / {held_db:.2f} | {s8:.3e} |",
                  flush=True)
        names = list(models)
        first = names[0]
        order = sorted(bases, key=lambda b: -contrib[first][b][0])
        print(f"\nOne layer quantized, all others float: 1−cos on the 8 eval sentences (×1e-6), and the layer's "
              f"held-out output SQNR (dB); the {a.top} largest by {first}:\n")
        print("| layer | " + " | ".join(f"{n} 1−cos | {n} SQNR" for n in names) + " |")
        print("|---|" + "---:|---:|" * len(names))
        for b in order[:a.top]:
            cells = []
            for n in names:
                cells.append(f"{contrib[n][b][0] * 1e6:.2f} | "
                             f"{output_sqnr_db(W[b], models[n][b], hdata.for_layer(b).hessian_mean()):.2f}")
            print(f"| {b} | " + " | ".join(cells) + " |")
        last = names[-1]
        worst = sorted(bases, key=lambda b: -contrib[last][b][0])
        for n_float in (1, 2):
            keep = {b: w for b, w in models[last].items() if b not in worst[:n_float]}
            c8, c24 = one_minus_cos(keep)
            print(f"\n{last} with {', '.join(worst[:n_float])} left in float: W8A16 cos {1 - c8:.6f} (8), "
                  f"{1 - c24:.6f} (24)")
        data.close()
        hdata.close()


if __name__ == "__main__":
    main()
