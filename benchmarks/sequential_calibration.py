"""Would calibrating layer by layer on the quantized model's own activations lift the example's cosine?
(issue 17: the MiniLM example's held-out W8A16 cosine stops short of 0.99990; docs/OPTIMIZERS.md.)

    python benchmarks/sequential_calibration.py [--optimizer gptq] [--modes float,seq,seq_target] [--ridge 0.01]

MiniLM-L6, per-row int8, the example's 417 calibration sentences; every linear layer but the pooler (which
the mean-pooled embedding does not use), in model order, layers that read one input (q/k/v) together:

* ``float``       the usual statistics: ``H = Σ x xᵀ`` of the float model's inputs (what the CLI uses);
* ``seq``         ``H_qq = Σ x_q x_qᵀ`` of the inputs the model sees with every earlier layer already
                  quantized (GPTQ's "sequential" mode);
* ``seq_target``  also aims each layer at the float model's output: the least-squares target
                  ``W' = (W H_fq + λW)(H_qq + λI)⁻¹`` (``H_fq = Σ x_f x_qᵀ``, ridge ``λ`` relative to the mean
                  diagonal, toward W), quantized under ``H_qq``.

Prints the end-to-end W8A16 sentence cosine against the float model on the 8 evaluation sentences and
on 24 held-out sentences. Each mode re-runs both models on the calibration set once per input group
(about 1.5-10 minutes per mode on a 2-core CPU).
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizer", default="gptq")
    p.add_argument("--modes", default="float,seq,seq_target")
    p.add_argument("--ridge", type=float, default=0.01)
    a = p.parse_args(argv)
    from quality import HELDOUT_EXTRA
    import convert_to_quant.quant_core.example as ex
    from convert_to_quant.quant_core.calibration import LayerStats
    from convert_to_quant.quant_core.formats import make_spec
    from convert_to_quant.quant_core.optimizers import LayerContext, get_optimizer, quantize_layer
    OPT, MODES, RIDGE = a.optimizer, a.modes.split(","), a.ridge

    held = list(ex.EVAL_SENTENCES) + HELDOUT_EXTRA
    ref_model, tok = ex.load_model()
    ref = ex.embed(ref_model, tok, held)
    sents = ex.CALIBRATION_SENTENCES
    batches = [tok(list(sents[i:i + 16]), padding=True, truncation=True, max_length=128, return_tensors="pt")
               for i in range(0, len(sents), 16)]
    spec = make_spec(scaling_mode="axis")
    linears = [(n, m) for n, m in ref_model.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n]
    # groups of layers sharing one input
    groups = []
    for n, m in linears:
        key = n.rsplit(".", 1)[0] if n.endswith(("query", "key", "value")) else n
        if groups and groups[-1][0] == key:
            groups[-1][1].append(n)
        else:
            groups.append((key, [n]))

    @torch.no_grad()
    def capture(model_f, model_q, name):
        """H_qq = Σ x_q x_qᵀ, H_qf = Σ x_q x_fᵀ over unpadded tokens, for the input of layer ``name``."""
        store = {}

        def hook(tag):
            def h(mod, inp, out):
                store[tag] = inp[0].detach().double()
            return h
        hs = [dict(model_f.named_modules())[name].register_forward_hook(hook("f")),
              dict(model_q.named_modules())[name].register_forward_hook(hook("q"))]
        d = dict(model_f.named_modules())[name].in_features
        hqq = torch.zeros(d, d, dtype=torch.float64)
        hqf = torch.zeros(d, d, dtype=torch.float64)
        n = 0
        for b in batches:
            model_f(**b)
            model_q(**b)
            mask = b["attention_mask"].bool()
            xf, xq = store["f"][mask], store["q"][mask]
            hqq += xq.T @ xq
            hqf += xq.T @ xf
            n += xq.shape[0]
        for h in hs:
            h.remove()
        return hqq, hqf, n

    def quantize(w, hsum, n):
        d = hsum.shape[0]
        stats = LayerStats("x", hsum.float(), torch.ones(d), torch.zeros(d), n, n)
        ctx = LayerContext(base="x", stats=stats, options={}, orig_dtype=torch.float32)
        return quantize_layer(get_optimizer(OPT), w, spec, ctx).qw.dequantize().float()

    for mode in MODES:
        t0 = time.perf_counter()
        model_q = copy.deepcopy(ref_model)
        mods = dict(model_q.named_modules())
        for key, names in groups:
            hqq, hqf, n = capture(ref_model, model_q if mode != "float" else ref_model, names[0])
            for name in names:
                w = dict(ref_model.named_modules())[name].weight.detach().double()
                if mode == "seq_target":
                    # min ||x_f Wᵀ - x_q Ŵᵀ||²: Ŵ* = W H_fq H_qq⁻¹ (ridge relative to the mean diagonal)
                    lam = RIDGE * float(hqq.diagonal().mean())
                    # ridge toward W (not toward 0): (W H_fq + lam W)(H_qq + lam I)^-1
                    wt = torch.linalg.solve(hqq + lam * torch.eye(hqq.shape[0], dtype=torch.float64),
                                            hqf @ w.T + lam * w.T).T
                else:
                    wt = w
                wq = quantize(wt.float(), hqq, n)
                with torch.no_grad():
                    mods[name].weight.copy_(wq)
        c = ex.cosines(ref, ex.embed(model_q, tok, held))
        print(f"{OPT} {mode} ridge {RIDGE}: W8A16 cos 8 eval {sum(c[:8]) / 8:.6f} (min {min(c[:8]):.6f}), "
              f"24 held-out {sum(c) / len(c):.6f}; {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
