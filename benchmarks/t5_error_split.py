"""Where a T5 encoder's int8 error comes from: the output cosine of ComfyUI's T5 (the benchmark's random
weights, ``comfy_step.py --text-encoder`` style) vs float when every Linear runs W8A8 (per-token int8
activations), W8A16 (bfloat16 activations), or W8A16 only on some layers -- computed in torch
on the CPU with our quantizer and activation quantizer (``kernels.reference``). Prints each layer kind's
mean activation abs-max / RMS.

    python benchmarks/t5_error_split.py --comfyui /path/to/ComfyUI [--d-model 1024 --d-ff 2560 --tokens 128]
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True, help="ComfyUI source folder")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=2560)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args(argv)
    sys.path.insert(0, args.comfyui)
    sys.path.insert(0, HERE)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # before anything imports comfy.model_management
    from comfy_step import load_repo_package, random_like_module
    load_repo_package()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    import comfy.ops
    import comfy.text_encoders.t5
    from convert_to_quant.kernels import reference as R
    from convert_to_quant.quant_core.formats import Int8Tensorwise
    heads = 64
    with open(os.path.join(args.comfyui, "comfy", "text_encoders", "t5_config_xxl.json")) as f:
        config = json.load(f)
    config.update({"d_model": args.d_model, "d_ff": args.d_ff, "num_heads": heads, "d_kv": args.d_model // heads,
                   "num_layers": args.layers})
    m = comfy.text_encoders.t5.T5(config, torch.float32, "cpu", comfy.ops.manual_cast)
    sd = random_like_module(m, "cpu", torch.bfloat16, seed=0)
    for k in sd:  # as comfy_step.py: T5's q weights carry the 1/sqrt(d_kv) its attention leaves out
        if k.endswith("SelfAttention.q.weight"):
            sd[k] = (sd[k].float() / config["d_kv"] ** 0.5).to(torch.bfloat16)
    m.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    ids = torch.randint(2, config["vocab_size"], (1, args.tokens), generator=torch.Generator().manual_seed(1))
    lins = {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    qws = {n: Int8Tensorwise.quantize(mod.weight.data.clone(), Int8Tensorwise.Params("row"), torch.bfloat16)
           for n, mod in lins.items()}
    state = {"rule": None, "stats": {}}

    def make_forward(name, mod):
        plain = mod.forward

        def forward(x):
            how = state["rule"](name)
            if how == "float":
                return plain(x)
            w = qws[name].dequantize().float()
            x2 = x.reshape(-1, x.shape[-1]).float()
            if how == "w8a16":
                y = x2.to(torch.bfloat16).float() @ w.T
            else:
                q, s = R.quantize_activations(x2, 0, 0)
                y = (q.float() * s.reshape(-1, 1)) @ w.T
            a = x2.abs()
            state["stats"].setdefault(name.split(".")[-1], []).append(
                float((a.amax(1) / a.pow(2).mean(1).sqrt()).mean()))
            return y.reshape(*x.shape[:-1], -1)
        return forward

    for n, mod in lins.items():
        mod.forward = make_forward(n, mod)

    def run(rule):
        state["rule"] = rule
        with torch.no_grad():
            return m(ids, None)[0].float().flatten()

    ref = run(lambda n: "float")
    print(f"T5-shaped encoder: d_model {args.d_model}, d_ff {args.d_ff}, {args.layers} layers, {args.tokens} tokens, "
          f"{len(lins)} linears; output vs float:")
    for name, rule in [("w8a8 all", lambda n: "w8a8"), ("w8a16 all", lambda n: "w8a16"),
                       ("w8a16 wo only", lambda n: "w8a16" if n.endswith("wo") else "w8a8"),
                       ("w8a16 wo+o", lambda n: "w8a16" if n.endswith(("wo", ".o")) else "w8a8"),
                       ("w8a16 q,k,wo", lambda n: "w8a16" if n.endswith(("wo", ".q", ".k")) else "w8a8")]:
        state["stats"] = {}
        y = run(rule)
        cos = torch.nn.functional.cosine_similarity(y, ref, dim=0).item()
        print(f"  {name:<14} cosine {cos:.5f}, rel err {((y - ref).norm() / ref.norm()).item():.4f}", flush=True)
    print("activation abs-max / RMS per layer kind:",
          {k: round(sum(v) / len(v), 1) for k, v in state["stats"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
