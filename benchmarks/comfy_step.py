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

Without a ComfyUI source tree, ``--dry-run`` runs the CPU fallback benchmark instead (pure torch): the same
Wan-shaped blocks (self-attention with q/k RMSNorm, cross-attention on text tokens, GELU FFN, adaLN
modulation; no RoPE) with every Linear either float (``F.linear``, what ComfyUI's ops run for a float model)
or int8, computed exactly as our loader's ops do it (``nodes/ops.py``: the stored tensors rebuilt with
``quantized_weight_from_tensors``, then ``quantized_linear(x, qw, bias, path=runtime_path(x.device))``):

    python benchmarks/comfy_step.py --dry-run [--dtype float32|bfloat16] [--format convrot] [--threads 2]
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
TORCH_DRY_SHAPES = {"tiny_273": (3, 7, 13)}  # 273 tokens per sample: the CPU report in issue 13
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


def load_repo_package():
    """This repository as the package ``convert_to_quant`` without ComfyUI (quant_core and kernels only)."""
    if "convert_to_quant" in sys.modules:
        return sys.modules["convert_to_quant"]
    spec = importlib.util.spec_from_file_location("convert_to_quant", os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["convert_to_quant"] = pkg
    spec.loader.exec_module(pkg)
    return pkg


def torch_fallback_bench(args) -> int:
    """--dry-run without ComfyUI: tiny Wan blocks on CPU, int8 through our runtime linear vs float."""
    load_repo_package()
    import torch
    import torch.nn.functional as F
    from convert_to_quant.kernels import quantized_linear, resolve_backend, runtime_path
    from convert_to_quant.quant_core.formats import make_spec, parse_comfy_quant, quantized_weight_from_tensors
    from convert_to_quant.quant_core.model_quant import plan_for_tensors, quantize_tensors
    from convert_to_quant.quant_core.plan import PlanOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    sd = wan_state_dict(args.dim, args.ffn, args.blocks, 4096, "cpu", torch.float32)
    sd = {k: v for k, v in sd.items() if k.startswith("blocks.")}
    spec = {"int8_tensorwise": make_spec(), "convrot": make_spec(convrot=True, convrot_groupsize=256),
            "int8_blockwise": make_spec(scaling_mode="block", block_size=128)}[args.format]
    plan = plan_for_tensors(sd, PlanOptions(spec=spec, presets=("auto",)))
    qsd = quantize_tensors(sd, plan, device=dev)
    path = runtime_path(dev)
    log(f"device: cpu, {torch.get_num_threads()} thread(s); torch {torch.__version__}; kernel backend "
        f"{resolve_backend(dev)}, runtime path {path or 'auto'}")
    log(f"model: Wan-2.1-shaped blocks (pure torch, no ComfyUI), dim {args.dim}, ffn {args.ffn}, "
        f"{max(1, args.dim // 128)} heads, {args.blocks} blocks; {args.dtype}; format {args.format}; "
        f"{len(plan.quantized_layers())} int8 layers")

    class Lin(torch.nn.Module):
        """nn.Linear's F.linear on a float weight, or what QuantLinearMixin.forward_quantized runs."""

        def __init__(self, base, quant):
            super().__init__()
            self.bias = sd[base + ".bias"].to(dtype)
            self.qw = None
            if quant and base + ".comfy_quant" in qsd:
                parts = {k[len(base) + 1:]: v for k, v in qsd.items()
                         if k.startswith(base + ".") and k[len(base) + 1:] not in ("bias", "comfy_quant")}
                self.qw = quantized_weight_from_tensors(base, parse_comfy_quant(qsd[base + ".comfy_quant"]), parts)
            else:
                self.weight = sd[base + ".weight"].to(dtype)

        def forward(self, x):
            if self.qw is None:
                return F.linear(x, self.weight, self.bias)
            return quantized_linear(x, self.qw, self.bias, path=runtime_path(x.device))

    def rms(x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w

    class Block(torch.nn.Module):
        def __init__(self, i, quant):
            super().__init__()
            p = f"blocks.{i}."
            self.lin = torch.nn.ModuleDict({n.replace(".", "_"): Lin(p + n, quant) for n in LORA_TARGETS})
            self.mod = sd[p + "modulation"].to(dtype)
            self.nq = {a: sd[f"{p}{a}.norm_q.weight"].to(dtype) for a in ("self_attn", "cross_attn")}
            self.nk = {a: sd[f"{p}{a}.norm_k.weight"].to(dtype) for a in ("self_attn", "cross_attn")}
            self.n3 = (sd[p + "norm3.weight"].to(dtype), sd[p + "norm3.bias"].to(dtype))

        def attn(self, a, x, ctx):
            b, n, d = x.shape
            h = max(1, d // 128)
            lin = self.lin
            q = rms(lin[a + "_q"](x), self.nq[a]).view(b, n, h, -1).transpose(1, 2)
            k = rms(lin[a + "_k"](ctx), self.nk[a]).view(b, ctx.shape[1], h, -1).transpose(1, 2)
            v = lin[a + "_v"](ctx).view(b, ctx.shape[1], h, -1).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
            return lin[a + "_o"](o)

        def forward(self, x, e, ctx):
            e = (self.mod + e).chunk(6, dim=1)
            d = x.shape[-1]
            y = F.layer_norm(x, (d,)) * (1 + e[1]) + e[0]
            x = x + self.attn("self_attn", y, y) * e[2]
            x = x + self.attn("cross_attn", F.layer_norm(x, (d,), *self.n3), ctx)
            y = F.layer_norm(x, (d,)) * (1 + e[4]) + e[3]
            return x + self.lin["ffn_2"](F.gelu(self.lin["ffn_0"](y), approximate="tanh")) * e[5]

    models = {name: [Block(i, name == "int8") for i in range(args.blocks)] for name in ("float", "int8")}
    results = {}
    for shape_name, (f, h, w) in TORCH_DRY_SHAPES.items():
        tokens = f * h * w
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, tokens, args.dim, generator=g).to(dtype)
        e = (torch.randn(2, 6, args.dim, generator=g) * 0.1).to(dtype)
        ctx = torch.randn(2, args.text_tokens, args.dim, generator=g).to(dtype)

        def step(blocks):
            y = x
            for blk in blocks:
                y = blk(y, e, ctx)
            return y

        times = {n: [] for n in models}
        outs = {}
        with torch.inference_mode():
            for i in range(args.warmup + args.steps):  # interleaved, so load on a shared machine hits both
                for n, blocks in models.items():
                    s = time.perf_counter()
                    outs[n] = step(blocks)
                    if i >= args.warmup:
                        times[n].append((time.perf_counter() - s) * 1e3)
        ms = {n: statistics.median(t) for n, t in times.items()}
        a, b = outs["int8"].double().flatten(), outs["float"].double().flatten()
        r = {"tokens": tokens, "ms": ms, "float_over_int8": ms["float"] / ms["int8"],
             "rel_err_int8_vs_float": float((a - b).norm() / b.norm()),
             "cosine_int8_vs_float": float(F.cosine_similarity(a, b, dim=0))}
        results[shape_name] = r
        log(f"\n== {shape_name}: {tokens} tokens per sample, batch 2 (cond + uncond) ==")
        for n in models:
            log(f"{n:>8}: {ms[n]:9.2f} ms/step (median of {args.steps})")
        log(f"float / int8 step time: {r['float_over_int8']:.3f}x (target >= 0.9)")
        log(f"int8 vs float output: rel error {r['rel_err_int8_vs_float']:.5f}, cosine {r['cosine_int8_vs_float']:.6f}")
    log("\nRESULT " + json.dumps({"device": "cpu", "threads": torch.get_num_threads(), "dtype": args.dtype,
                                  "dim": args.dim, "ffn": args.ffn, "blocks": args.blocks, "format": args.format,
                                  "path": path or "auto", "shapes": results}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", help="ComfyUI source folder (the one with main.py and comfy/); without it "
                                      "--dry-run runs the pure-torch CPU fallback benchmark")
    ap.add_argument("--dim", type=int, default=None, help="default 5120 (dry run: 256)")
    ap.add_argument("--ffn", type=int, default=None, help="default 13824 (dry run: 512)")
    ap.add_argument("--blocks", type=int, default=None, help="default 4 (dry run: 2)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="compute dtype of the CPU fallback benchmark (--dry-run without --comfyui)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads for the fallback benchmark")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--shapes", default="image_720p,video_480p_33f",
                    help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--format", choices=["int8_tensorwise", "convrot", "int8_blockwise"], default="int8_tensorwise")
    ap.add_argument("--loras", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="default 10 (dry run: 2, fallback benchmark: 9)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (dry run: 1)")
    ap.add_argument("--compile", action="store_true", help="also time both models under TorchCompileModel (inductor)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model: checks this script end to end")
    args = ap.parse_args(argv)

    dry = (256, 512, 2, 2, 1) if args.dry_run else (5120, 13824, 4, 10, 3)
    if args.dry_run and not args.comfyui:
        dry = (256, 512, 2, 9, 1)
    for name, v in zip(("dim", "ffn", "blocks", "steps", "warmup"), dry):
        if getattr(args, name) is None:
            setattr(args, name, v)
    if args.dry_run:
        args.text_tokens, args.lora_rank = 8, 8
        if not args.comfyui:
            return torch_fallback_bench(args)
        shapes = DRY_SHAPES
    else:
        if not args.comfyui:
            sys.exit("error: --comfyui is required (only --dry-run runs without ComfyUI)")
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
