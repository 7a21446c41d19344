"""Stock ComfyUI's LoRA application on tiny real-architecture models (run by ``$COMFYUI_PYTHON``).

Used by ``tests/test_lora_comfyui.py``; imports nothing from convert_to_quant. Usage::

    python comfyui_lora_reference.py make-bases <job.json>   # writes one base model per family
    python comfyui_lora_reference.py apply <job.json>        # LoRAs the stock way, weights and outputs

The models are ComfyUI's own classes (``comfy.supported_models`` configs with small widths), the
LoRAs go through ``comfy.sd.load_lora_for_models`` -- what the stock LoraLoader / LoraLoaderModelOnly
nodes call -- and ``ModelPatcher.patch_model`` computes the patched weights. ``apply`` also runs the
patched model and a fresh model holding the weights merged by convert_to_quant on the same inputs.
"""
import json
import os
import sys

COMFYUI_DIR = os.environ["COMFYUI_DIR"]
sys.path.insert(0, COMFYUI_DIR)
_cmd, _job = sys.argv[1], sys.argv[2]
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI parses the command line on import

import torch  # noqa: E402

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import comfy.cli_args  # noqa: E402,F401
import comfy.lora  # noqa: E402,F401
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models as sm  # noqa: E402
import comfy.utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

FAMILIES = {
    "flux": (sm.Flux, dict(image_model="flux", in_channels=4, patch_size=2, out_channels=4, vec_in_dim=8,
                           context_in_dim=16, hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1,
                           depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True,
                           guidance_embed=True)),
    # depth 2 -> hidden 128 (SD3 ties the width to the depth); block 0 has the SD3.5 attn2
    "sd3": (sm.SD3, dict(in_channels=4, out_channels=4, patch_size=2, depth=2, adm_in_channels=8,
                         context_embedder_config={"target": "torch.nn.Linear",
                                                  "params": {"in_features": 16, "out_features": 128}},
                         pos_embed_max_size=8, x_block_self_attn_layers=[0], qk_norm="rms")),
    "wan": (sm.WAN21_T2V, dict(image_model="wan2.1", model_type="t2v", dim=64, out_dim=4, num_heads=2, ffn_dim=128,
                               num_layers=1, patch_size=(1, 2, 2), freq_dim=32, window_size=(-1, -1), qk_norm=True,
                               cross_attn_norm=True, eps=1e-6, in_dim=4, text_len=8, text_dim=16)),
    "hunyuan_video": (sm.HunyuanVideo, dict(image_model="hunyuan_video", in_channels=4, out_channels=4,
                                            patch_size=[1, 2, 2], vec_in_dim=8, context_in_dim=16, hidden_size=64,
                                            mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
                                            axes_dim=[8, 12, 12], theta=256, qkv_bias=True, guidance_embed=True,
                                            byt5=False, meanflow=False)),
}


def build(family):
    cls, cfg = FAMILIES[family]
    mc = cls(dict(cfg))
    mc.set_inference_dtype(torch.float32, None)
    return mc.get_model({}, "", device="cpu")


def inputs(family):
    g = torch.Generator().manual_seed(1234)
    video = family in ("wan", "hunyuan_video")
    x = torch.randn((1, 4, 1, 4, 4) if video else (1, 4, 8, 8), generator=g)
    ctx = torch.randn(1, 8 if family == "wan" else 6, 16, generator=g)
    kw = {}
    if family != "wan":
        kw["y"] = torch.randn(1, 8, generator=g)
    if family in ("flux", "hunyuan_video"):
        kw["guidance"] = torch.tensor([3.5])
    return x, ctx, kw


def run(model, family):
    x, ctx, kw = inputs(family)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([0.5]), c_crossattn=ctx, **kw)


def make_bases(job):
    for i, (family, path) in enumerate(sorted(job["bases"].items())):
        model = build(family)
        g = torch.Generator().manual_seed(100 + i)
        sd = {}
        with torch.no_grad():
            for k, v in model.diffusion_model.state_dict().items():
                sd[k] = (torch.randn(v.shape, generator=g) * 0.05).to(torch.float32)
        save_file(sd, path)


def apply(job):
    results = {}
    for case in job["cases"]:
        family = case["family"]
        base = load_file(case["base"])
        model = build(family)
        model.diffusion_model.load_state_dict(base, strict=True)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                   offload_device=torch.device("cpu"))
        for path, strength in case["loras"]:
            lora = comfy.utils.load_torch_file(path, safe_load=True)
            patcher, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
        patcher.patch_model(device_to=torch.device("cpu"))
        patched = {k: v.detach().clone().contiguous() for k, v in model.diffusion_model.state_dict().items()}
        out_stock = run(model, family)
        save_file(patched, case["patched_out"])

        ours = build(family)
        ours.diffusion_model.load_state_dict(load_file(case["merged"]), strict=True)
        out_ours = run(ours, family)
        save_file({"stock_lora": out_stock.contiguous(), "merged_by_us": out_ours.contiguous()}, case["outputs_out"])
        results[case["name"]] = {"patched_keys": len(patcher.patches)}
    with open(job["result"], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    with open(_job) as f:
        job = json.load(f)
    {"make-bases": make_bases, "apply": apply}[_cmd](job)
