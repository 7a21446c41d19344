"""Per-step time of a Wan-2.1-shaped DiT inside ComfyUI: our int8 loader vs the same model in bf16 with
ComfyUI's own ops, and both with two rank-32 LoRAs loaded through ComfyUI's stock LoRA path.

One denoising step = one ``BaseModel.apply_model`` call on a batch of 2 (cond + uncond, as KSampler with
CFG runs it). The model is built at a realistic width (default: Wan 2.1 14B, dim 5120, ffn 13824, 40 heads)
with only a few blocks; every block is identical, so the per-step ratio is the full model's. Weights are
random (N(0, 1/in)); the int8 model is written to a safetensors file with ``quant_core`` and loaded by
``nodes.loader.load_diffusion_model`` (the Load Quantized Diffusion Model node), the bf16 one by
``comfy.sd.load_diffusion_model_state_dict`` (what UNETLoader runs). LoRAs go through
``comfy.sd.load_lora_for_models`` (what LoraLoaderModelOnly runs): stock ComfyUI merges them into the bf16
weights, our patcher runs them as a low-rank side path next to the int8 GEMM.

Needs a ComfyUI source tree (not installed: its folder is put on ``sys.path``) and a CUDA GPU:

    python benchmarks/comfy_step.py --comfyui /path/to/ComfyUI
    python benchmarks/comfy_step.py --comfyui /path/to/ComfyUI --shapes video_480p_33f --blocks 2
    python benchmarks/comfy_step.py --comfyui /path/to/ComfyUI --dry-run     # CPU smoke test, tiny model

Prints ms/step (median over ``--steps`` after ``--warmup``), output errors against bf16, and the ratios the
issue targets: bf16 / int8 >= 1.3 and int8+2 LoRAs / int8 <= 1.10.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# latent frames x height x width of the patchified video (Wan: VAE 4x temporal / 8x spatial, patch 1x2x2)
SHAPES = {
    "video_480p_33f": (9, 30, 52),   # 832x480, 33 frames -> 14,040 tokens
    "video_480p_81f": (21, 30, 52),  # 832x480, 81 frames -> 32,760 tokens
    "image_720p": (1, 45, 80),       # 1280x720, 1 frame -> 3,600 tokens
}
DRY_SHAPES = {"tiny": (1, 4, 4)}
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def log(*a):
    print(*a, flush=True)


def setup_imports(comfy_dir: str, cpu: bool):
    """ComfyUI from its source folder, this repository as the package ``convert_to_quant`` (as ComfyUI
    imports a custom node: by file location, so it needs no install)."""
    comfy_dir = os.path.abspath(comfy_dir)
    if not os.path.isfile(os.path.join(comfy_dir, "comfy", "model_patcher.py")):
        sys.exit(f"error: {comfy_dir} is not a ComfyUI source folder (no comfy/model_patcher.py)")
    sys.path.insert(0, comfy_dir)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    spec = importlib.util.spec_from_file_location("convert_to_quant", os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["convert_to_quant"] = pkg
    spec.loader.exec_module(pkg)
    if not pkg.NODE_CLASS_MAPPINGS:
        sys.exit("error: the node pack did not register inside ComfyUI")
    return pkg


def wan_state_dict(dim, ffn, blocks, text_dim, device, dtype, seed=0):
    import torch
    g = torch.Generator(device=device).manual_seed(seed)

    def lin(o, i):
        return (torch.randn(o, i, generator=g, device=device, dtype=torch.float32) / i ** 0.5).to(dtype)

    def vec(n, scale=0.02, center=0.0):
        return (center + scale * torch.randn(n, generator=g, device=device)).to(dtype)

    sd = {"patch_embedding.weight": (torch.randn(dim, 16, 1, 2, 2, generator=g, device=device) / 8).to(dtype),
          "patch_embedding.bias": vec(dim),
          "text_embedding.0.weight": lin(dim, text_dim), "text_embedding.0.bias": vec(dim),
          "text_embedding.2.weight": lin(dim, dim), "text_embedding.2.bias": vec(dim),
          "time_embedding.0.weight": lin(dim, 256), "time_embedding.0.bias": vec(dim),
          "time_embedding.2.weight": lin(dim, dim), "time_embedding.2.bias": vec(dim),
          "time_projection.1.weight": lin(6 * dim, dim), "time_projection.1.bias": vec(6 * dim),
          "head.modulation": (torch.randn(1, 2, dim, generator=g, device=device) / dim ** 0.5).to(dtype),
          "head.head.weight": lin(64, dim), "head.head.bias": vec(64)}
    for i in range(blocks):
        p = f"blocks.{i}."
        sd[p + "modulation"] = (torch.randn(1, 6, dim, generator=g, device=device) / dim ** 0.5).to(dtype)
        for att in ("self_attn", "cross_attn"):
            for n in ("q", "k", "v", "o"):
                sd[f"{p}{att}.{n}.weight"] = lin(dim, dim)
                sd[f"{p}{att}.{n}.bias"] = vec(dim)
            sd[f"{p}{att}.norm_q.weight"] = vec(dim, 0.1, 1.0)
            sd[f"{p}{att}.norm_k.weight"] = vec(dim, 0.1, 1.0)
        sd[p + "norm3.weight"], sd[p + "norm3.bias"] = vec(dim, 0.1, 1.0), vec(dim)
        sd[p + "ffn.0.weight"], sd[p + "ffn.0.bias"] = lin(ffn, dim), vec(ffn)
        sd[p + "ffn.2.weight"], sd[p + "ffn.2.bias"] = lin(dim, ffn), vec(dim)
    return sd


def wan_lora(dim, ffn, blocks, rank, seed, dtype):
    """PEFT-style LoRA over every linear of every block (B not zero, so it changes the output)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    shapes = {"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    out = {}
    for i in range(blocks):
        for t in LORA_TARGETS:
            o, n = shapes.get(t, (dim, dim))
            k = f"diffusion_model.blocks.{i}.{t}"
            out[k + ".lora_A.weight"] = (torch.randn(rank, n, generator=g) / n ** 0.5).to(dtype)
            out[k + ".lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.2 / rank ** 0.5).to(dtype)
            out[k + ".alpha"] = torch.tensor(float(rank))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True, help="ComfyUI source folder (the one with main.py and comfy/)")
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--shapes", default="image_720p,video_480p_33f",
                    help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--format", choices=["int8_tensorwise", "convrot", "int8_blockwise"], default="int8_tensorwise")
    ap.add_argument("--loras", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time both models under TorchCompileModel (inductor)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model: checks this script end to end")
    args = ap.parse_args(argv)

    if args.dry_run:
        args.dim, args.ffn, args.blocks, args.text_tokens = 256, 512, 2, 8
        args.steps, args.warmup, args.lora_rank = 2, 1, 8
        shapes = DRY_SHAPES
    else:
        shapes = {}
        for s in args.shapes.split(","):
            if s not in SHAPES:
                sys.exit(f"error: unknown shape {s!r}; known: {', '.join(SHAPES)}")
            shapes[s] = SHAPES[s]
    setup_imports(args.comfyui, cpu=args.dry_run)

    import torch
    import comfy.model_management as mm
    import comfy.sd
    from convert_to_quant.kernels import triton_usable
    from convert_to_quant.nodes.loader import load_diffusion_model
    from convert_to_quant.nodes.ops import quant_linears
    from convert_to_quant.quant_core.formats import make_spec
    from convert_to_quant.quant_core.model_quant import plan_for_tensors, quantize_tensors
    from convert_to_quant.quant_core.plan import PlanOptions
    from convert_to_quant.quant_core.safetensors_io import save_file

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU (use --dry-run for the CPU smoke test)")
    dev = mm.get_torch_device()
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log(f"device: {card}; torch {torch.__version__}; triton kernels: {triton_usable(dev)}")
    log(f"model: Wan-2.1-shaped, dim {args.dim}, ffn {args.ffn}, {args.dim // 128} heads, {args.blocks} blocks; "
        f"format {args.format}; {args.loras} LoRA(s) of rank {args.lora_rank}")

    t0 = time.time()
    gen_dev = "cuda" if dev.type == "cuda" else "cpu"
    sd = wan_state_dict(args.dim, args.ffn, args.blocks, 4096, gen_dev, torch.bfloat16)
    spec = {"int8_tensorwise": make_spec(), "convrot": make_spec(convrot=True, convrot_groupsize=256),
            "int8_blockwise": make_spec(scaling_mode="block", block_size=128)}[args.format]
    plan = plan_for_tensors(sd, PlanOptions(spec=spec, presets=("auto",)))
    qsd = quantize_tensors(sd, plan, device=torch.device(gen_dev))
    tmp = tempfile.mkdtemp(prefix="ctq-bench-")
    qpath = save_file(qsd, os.path.join(tmp, "wan_int8.safetensors"))
    del qsd
    sd = {k: v.cpu() for k, v in sd.items()}
    loras = [wan_lora(args.dim, args.ffn, args.blocks, args.lora_rank, seed=10 + i, dtype=torch.bfloat16)
             for i in range(args.loras)]
    log(f"built and quantized in {time.time() - t0:.1f} s ({len(plan.quantized_layers())} int8 layers, "
        f"file {os.path.getsize(qpath) / 1e9:.2f} GB)")

    def bf16_model():
        return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype})

    def int8_model():
        return load_diffusion_model(qpath, dtype)

    def with_loras(m):
        for lora in loras:
            m, _ = comfy.sd.load_lora_for_models(m, None, lora, 1.0, 0.0)
        return m

    def compiled(m):
        from comfy_api.torch_helpers import set_torch_compile_wrapper
        m = m.clone()
        set_torch_compile_wrapper(model=m, backend="inductor")
        return m

    def time_steps(patcher, x, t, ctx):
        mm.unload_all_models()
        mm.soft_empty_cache()
        mm.load_models_gpu([patcher], force_full_load=True)
        opts = {"wrappers": patcher.wrappers} if patcher.wrappers else {}
        times = []
        with torch.inference_mode():
            for i in range(args.warmup + args.steps):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                s = time.perf_counter()
                out = patcher.model.apply_model(x, t, c_crossattn=ctx, transformer_options=opts)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                if i >= args.warmup:
                    times.append((time.perf_counter() - s) * 1e3)
        return statistics.median(times), out.float()

    results = {}
    variants = [("bf16", lambda: bf16_model()), ("bf16+loras", lambda: with_loras(bf16_model())),
                ("int8", lambda: int8_model()), ("int8+loras", lambda: with_loras(int8_model()))]
    if args.compile:
        variants += [("bf16 compiled", lambda: compiled(bf16_model())), ("int8 compiled", lambda: compiled(int8_model())),
                     ("int8+loras compiled", lambda: compiled(with_loras(int8_model())))]
    for shape_name, (f, h, w) in shapes.items():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 16, f, 2 * h, 2 * w, generator=g).to(dev, dtype)
        t = torch.tensor([0.6, 0.6], device=dev)
        ctx = torch.randn(2, args.text_tokens, 4096, generator=g).to(dev, dtype)
        tokens = f * h * w
        log(f"\n== {shape_name}: {tokens} tokens per sample, batch 2 (cond + uncond) ==")
        row, outs = {}, {}
        for name, make in variants:
            m = make()
            if name.startswith("int8") and not quant_linears(m.model):
                sys.exit("error: the int8 model has no int8 layers")
            ms, out = time_steps(m, x, t, ctx)
            row[name], outs[name] = ms, out
            log(f"{name:>22}: {ms:9.2f} ms/step")
            del m
        mm.unload_all_models()

        def err(a, b):
            return float((outs[a] - outs[b]).norm() / outs[b].norm())
        r = {"tokens": tokens, "ms": row,
             "speedup_bf16_over_int8": row["bf16"] / row["int8"],
             "lora_overhead_int8": row["int8+loras"] / row["int8"],
             "lora_overhead_bf16": row["bf16+loras"] / row["bf16"],
             "rel_err_int8_vs_bf16": err("int8", "bf16"),
             "rel_err_int8_loras_vs_bf16_loras": err("int8+loras", "bf16+loras"),
             "lora_effect_bf16": err("bf16+loras", "bf16")}
        if args.compile:
            r["speedup_compiled"] = row["bf16 compiled"] / row["int8 compiled"]
            r["lora_overhead_int8_compiled"] = row["int8+loras compiled"] / row["int8 compiled"]
        results[shape_name] = r
        log(f"speed-up bf16 -> int8: {r['speedup_bf16_over_int8']:.3f}x (target >= 1.3)")
        log(f"int8 + {args.loras} LoRAs / int8: {r['lora_overhead_int8']:.3f} (target <= 1.10); "
            f"stock bf16 + LoRAs / bf16: {r['lora_overhead_bf16']:.3f}")
        log(f"output error vs bf16: int8 {r['rel_err_int8_vs_bf16']:.4f}, with LoRAs "
            f"{r['rel_err_int8_loras_vs_bf16_loras']:.4f} (LoRA effect {r['lora_effect_bf16']:.4f})")
        if args.compile:
            log(f"compiled: speed-up {r['speedup_compiled']:.3f}x, LoRA overhead {r['lora_overhead_int8_compiled']:.3f}")
    log("\nRESULT " + json.dumps({"device": card, "dim": args.dim, "ffn": args.ffn, "blocks": args.blocks,
                                  "format": args.format, "loras": args.loras, "lora_rank": args.lora_rank,
                                  "shapes": results}))
    os.unlink(qpath)
    os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
