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
    python benchmarks/comfy_step.py --comfyui /path/to/ComfyUI --model flux  # Flux.1-dev-shaped, 1024x1024
    python benchmarks/comfy_step.py --comfyui /path/to/ComfyUI --text-encoder  # T5-XXL-shaped, 512 tokens
    python benchmarks/comfy_step.py --comfyui /path/to/ComfyUI --attention int8 --shapes video_480p_81f
        # adds "int8+attn8": int8 weights and INT8 attention (the loader's attention=int8 option), and splits
        # every profiled step into linear layers / attention / the rest

Prints ms/step (median over ``--steps`` after ``--warmup``), output errors against bf16, and the ratios the
issue targets: bf16 / int8 >= 1.3 and int8+2 LoRAs / int8 <= 1.10. For every model, a profiled bf16 and
int8 step split into linear-layer kernels vs the rest, and the speed-up bound a 2x faster linear part allows
(``profile_split`` / ``split_report``; docs/NODES.md, "Speed on a GPU").


Without a ComfyUI source tree, ``--dry-run`` runs the CPU fallback benchmark instead (pure torch): the same
Wan-shaped blocks (self-attention with q/k RMSNorm, cross-attention on text tokens, GELU FFN, adaLN
modulation; no RoPE) with every Linear either float (``F.linear``, what ComfyUI's ops run for a float model)
or int8, computed exactly as our loader's ops do it (``nodes/ops.py``: the stored tensors rebuilt with
``quantized_weight_from_tensors``, then ``quantized_linear(x, qw, bias, path=runtime_path(x.device))``):

    python benchmarks/comfy_step.py --dry-run [--dtype float32|bfloat16] [--format all|convrot|...] [--threads 2]

Each round steps every model once (float, then each int8 format; the order rotated per round); printed are
min / median / max ms per step and, per format, the quartiles over rounds of that round's float / int8 time.
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


# --dry-run without ComfyUI: the int8 weight formats (label -> make_spec keywords)
FALLBACK_FORMATS = {
    "int8_tensorwise": ("per-row", {}),  # int8_tensorwise with the CLI's default per-row scales
    "int8_pertensor": ("tensor-wise", {"scaling_mode": "tensor"}),
    "convrot": ("convrot", {"convrot": True, "convrot_groupsize": 256}),
    "int8_blockwise": ("block-wise", {"scaling_mode": "block", "block_size": 128}),
}


def quartiles(v):
    """(min, lower quartile, median, upper quartile, max) of the values ``v``."""
    import statistics
    s = sorted(v)
    if len(s) < 2:
        return (s[0],) * 5
    q1, q2, q3 = statistics.quantiles(s, n=4, method="inclusive")
    return s[0], q1, q2, q3, s[-1]


def torch_fallback_bench(args) -> int:
    """--dry-run without ComfyUI: tiny Wan blocks on CPU, int8 through our runtime linear vs float.

    Every round runs one step of each model (float and each int8 format) back to back, the order rotated
    from round to round, so load on a shared machine hits all of them alike; a format's ratio is the
    median over rounds of that round's float time / its time (and the spread of those ratios)."""
    load_repo_package()
    import torch
    import torch.nn.functional as F
    from convert_to_quant.kernels import int8_attention, prepare_linear, resolve_backend, runtime_path
    from convert_to_quant.quant_core.formats import make_spec, parse_comfy_quant, quantized_weight_from_tensors
    from convert_to_quant.quant_core.model_quant import plan_for_tensors, quantize_tensors
    from convert_to_quant.quant_core.plan import PlanOptions

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    sd = wan_state_dict(args.dim, args.ffn, args.blocks, 4096, "cpu", torch.float32)
    sd = {k: v for k, v in sd.items() if k.startswith("blocks.")}
    fmts = list(FALLBACK_FORMATS) if args.format == "all" else [args.format]
    qsds = {}
    for f in fmts:
        plan = plan_for_tensors(sd, PlanOptions(spec=make_spec(**FALLBACK_FORMATS[f][1]), presets=("auto",)))
        qsds[f] = quantize_tensors(sd, plan, device=dev)
    path = runtime_path(dev)
    log(f"device: cpu, {torch.get_num_threads()} thread(s); torch {torch.__version__}; kernel backend "
        f"{resolve_backend(dev)}, runtime path {path or 'auto'}")
    log(f"model: Wan-2.1-shaped blocks (pure torch, no ComfyUI), dim {args.dim}, ffn {args.ffn}, "
        f"{max(1, args.dim // 128)} heads, {args.blocks} blocks; {args.dtype}; formats "
        f"{', '.join(FALLBACK_FORMATS[f][0] for f in fmts)}; {len(plan.quantized_layers())} int8 layers")

    class Lin(torch.nn.Module):
        """nn.Linear's F.linear on a float weight, or what QuantLinearMixin.forward_quantized runs (its
        PreparedLinear, called with runtime_path(x.device))."""

        def __init__(self, base, qsd):
            super().__init__()
            self.bias = sd[base + ".bias"].to(dtype)
            self.run = None
            if qsd is not None and base + ".comfy_quant" in qsd:
                parts = {k[len(base) + 1:]: v for k, v in qsd.items()
                         if k.startswith(base + ".") and k[len(base) + 1:] not in ("bias", "comfy_quant")}
                qw = quantized_weight_from_tensors(base, parse_comfy_quant(qsd[base + ".comfy_quant"]), parts)
                self.run = prepare_linear(qw, dev)
            else:
                self.weight = sd[base + ".weight"].to(dtype)

        def forward(self, x):
            if self.run is None:
                return F.linear(x, self.weight, self.bias)
            return self.run(x, self.bias, runtime_path(x.device))

    def rms(x, w):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w

    class Block(torch.nn.Module):
        def __init__(self, i, qsd, attention8=False):
            super().__init__()
            self.int8_attention = attention8
            p = f"blocks.{i}."
            self.lin = torch.nn.ModuleDict({n.replace(".", "_"): Lin(p + n, qsd) for n in LORA_TARGETS})
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
            if self.int8_attention:  # what the loader's attention=int8 option runs (torch path on CPU)
                o = int8_attention(q, k, v).reshape(b, n, d)
            else:
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

    label = {f: "int8" if len(fmts) == 1 else FALLBACK_FORMATS[f][0] for f in fmts}
    models = {"float": [Block(i, None) for i in range(args.blocks)]}
    for f in fmts:
        models[label[f]] = [Block(i, qsds[f]) for i in range(args.blocks)]
    if args.attention == "int8":
        models["int8+attn8"] = [Block(i, qsds[fmts[0]], True) for i in range(args.blocks)]
    names = list(models)
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

        times = {n: [] for n in names}
        outs = {}
        load = [os.getloadavg()[0]]  # other work on the machine: the spread of the ratios shows what it did
        with torch.inference_mode():
            for i in range(args.warmup + args.steps):
                for j in range(len(names)):  # A/B/A/B, the order rotated each round
                    n = names[(i + j) % len(names)]
                    s = time.perf_counter()
                    outs[n] = step(models[n])
                    if i >= args.warmup:
                        times[n].append((time.perf_counter() - s) * 1e3)
        load.append(os.getloadavg()[0])
        log(f"\n== {shape_name}: {tokens} tokens per sample, batch 2 (cond + uncond); {args.steps} rounds "
            f"after {args.warmup} warm-up; load average {load[0]:.2f} before, {load[1]:.2f} after ==")
        log(f"{'':>12}  ms/step: {'min':>8} {'median':>8} {'max':>8}   float/int8 per round: "
            f"{'min':>6} {'q1':>6} {'median':>6} {'q3':>6} {'max':>6}   rel err, cosine vs float")
        b = outs["float"].double().flatten()
        r = {"tokens": tokens, "rounds": args.steps, "ms": {}, "ratio": {}, "ratio_of_min": {}, "rel_err_vs_float": {},
             "cosine_vs_float": {}, "load_average": load}
        for n in names:
            qt = quartiles(times[n])
            r["ms"][n] = {"min": qt[0], "median": qt[2], "max": qt[4]}
            line = f"{n:>12}           {qt[0]:8.2f} {qt[2]:8.2f} {qt[4]:8.2f}"
            if n != "float":
                ratios = [a / c for a, c in zip(times["float"], times[n])]
                rq = quartiles(ratios)
                r["ratio"][n] = dict(zip(("min", "q1", "median", "q3", "max"), rq))
                r["ratio_of_min"][n] = min(times["float"]) / qt[0]
                a = outs[n].double().flatten()
                r["rel_err_vs_float"][n] = float((a - b).norm() / b.norm())
                r["cosine_vs_float"][n] = float(F.cosine_similarity(a, b, dim=0))
                line += ("                         " + " ".join(f"{v:6.3f}" for v in rq)
                         + f"   {r['rel_err_vs_float'][n]:.5f}, {r['cosine_vs_float'][n]:.6f}"
                         + f"   (min/min {r['ratio_of_min'][n]:.3f})")
            log(line)
        if "int8" in r["ratio"]:  # the single-format keys of earlier versions
            r["float_over_int8"] = r["ratio"]["int8"]["median"]
        worst = min(r["ratio"], key=lambda n: r["ratio"][n]["median"] if n != "int8+attn8" else 9)
        log(f"float / int8 step time, median of the per-round ratios: worst {worst} "
            f"{r['ratio'][worst]['median']:.3f}x (target >= 0.9)")
        if "int8+attn8" in outs:
            c = outs["int8+attn8"].double().flatten()
            a = outs[label[fmts[0]]].double().flatten()
            r["cosine_int8_attn8_vs_int8"] = float(F.cosine_similarity(c, a, dim=0))
            log(f"int8 + INT8 attention vs int8: cosine {r['cosine_int8_attn8_vs_int8']:.6f}")
        results[shape_name] = r
    log("\nRESULT " + json.dumps({"device": "cpu", "threads": torch.get_num_threads(), "dtype": args.dtype,
                                  "attention": args.attention,
                                  "dim": args.dim, "ffn": args.ffn, "blocks": args.blocks, "formats": fmts,
                                  "path": path or "auto", "shapes": results}))


# ---- Flux / T5 text encoder / step time split (issue 13, item 5) ------------------------------------------
# Flux.1-dev: 19 double-stream + 38 single-stream blocks, hidden 3072, 24 heads (head dim 128), mlp ratio 4;
# 1024x1024 -> latent 128x128 -> 4096 image tokens (patch 2); T5 context of 512 tokens; one step = one
# apply_model call on batch 1 with distilled guidance (no CFG batch).
FLUX_DEV_BLOCKS = (19, 38)
FLUX_LORA_TARGETS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj",
                     "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
T5_XXL_LAYERS = 24
# kernel names (GPU): attention first, so a cutlass/cudnn attention kernel is not counted as a linear GEMM
ATTN_KERNEL = ("flash", "fmha", "sdpa", "attention", "attn", "softmax")
LINEAR_KERNEL = ("gemm", "gemv", "nvjet", "xmma", "cublas", "cutlass", "splitk", "int8_gemm_kernel",
                 "act_quant_kernel", "w8a16_gemm_kernel", "dequant_kernel")
# op names (CPU fallback): outermost linear-layer op of each Linear call, our custom ops included
LINEAR_OPS = ("aten::linear", "aten::addmm", "aten::_int_mm")
LINEAR_OP_PREFIX = "convert_to_quant::"


def kernel_is_linear(name: str) -> bool:
    n = name.lower()
    if any(a in n for a in ATTN_KERNEL):
        return False
    return any(k in n for k in LINEAR_KERNEL)


def op_is_linear(name: str) -> bool:
    return name in LINEAR_OPS or name.startswith(LINEAR_OP_PREFIX)


def kernel_table(call, dev, name: str, top: int, steps: int = 3) -> list:
    """Prints (and returns) the ``top`` device kernels of one profiled run of ``steps`` calls by total time:
    [(kernel name, calls per step, ms per step)] -- where a variant's extra time goes (``--kernel-table``)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    if dev.type != "cuda":
        return []
    with torch.inference_mode():
        call()
        torch.cuda.synchronize(dev)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                call()
            torch.cuda.synchronize(dev)
    agg = {}
    for e in prof.events():
        if e.device_type == DeviceType.CPU or getattr(e, "is_user_annotation", False):
            continue
        n, t = agg.get(e.name, (0, 0.0))
        agg[e.name] = (n + 1, t + e.time_range.elapsed_us())
    rows = sorted(((k, n / steps, t / 1e3 / steps) for k, (n, t) in agg.items()), key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    log(f"kernels of {name}: {total:.2f} ms of device time per step")
    for k, n, ms in rows[:top]:
        log(f"  {ms:8.3f} ms {n:6.1f}x  {k[:150]}")
    return [(k, n, ms) for k, n, ms in rows[:top]]


def profile_split(call, dev, steps: int = 0) -> dict:
    """ms per call of the linear layers vs everything else, from one profiled run of ``steps`` calls (None
    where the profiler cannot run).

    On CUDA: every device kernel, grouped by name (``kernel_is_linear``). Where the profiler gives no device
    kernels (CPU, or no CUPTI): the CPU time of the outermost linear ops (``op_is_linear``, not counted again
    inside another one or inside attention) against the whole call."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    steps = steps or (3 if dev.type == "cuda" else 1)
    with torch.inference_mode():
        call()  # anything lazy (autotune, first compile) outside the profile
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        try:
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    with record_function("ctq::step"):
                        call()
                        if dev.type == "cuda":
                            torch.cuda.synchronize(dev)
            events = list(prof.events())
        except RuntimeError as e:  # a profiler that cannot start (CUPTI in use, ...): no split, the rest runs
            log(f"time split skipped: the profiler failed: {str(e).splitlines()[0][:200]}")
            return None
    kernels = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
               and e.name != "ctq::step"]  # kernels, memcpy / memset; not the step's range on the GPU timeline
    if kernels:
        lin = sum(e.time_range.elapsed_us() for e in kernels if kernel_is_linear(e.name))
        att = sum(e.time_range.elapsed_us() for e in kernels
                  if not kernel_is_linear(e.name) and any(a in e.name.lower() for a in ATTN_KERNEL))
        tot = sum(e.time_range.elapsed_us() for e in kernels)
        top = sorted({e.name for e in kernels if kernel_is_linear(e.name)})
        source = "device kernels by name"
    else:
        def linear_root(e):
            if not op_is_linear(e.name):
                return False
            p = e.cpu_parent
            while p is not None:
                if op_is_linear(p.name) or "attention" in p.name:
                    return False
                p = p.cpu_parent
            return True
        steps_ev = [e for e in events if e.name == "ctq::step"]
        tot = sum(e.cpu_time_total for e in steps_ev)
        lin = sum(e.cpu_time_total for e in events if e.device_type == DeviceType.CPU and linear_root(e))

        def attention_root(e):
            if "attention" not in e.name:
                return False
            p = e.cpu_parent
            while p is not None:
                if "attention" in p.name:
                    return False
                p = p.cpu_parent
            return True
        att = sum(e.cpu_time_total for e in events if e.device_type == DeviceType.CPU and attention_root(e))
        top = sorted({e.name for e in events if e.device_type == DeviceType.CPU and linear_root(e)})
        source = "CPU op times by op name (no device kernels profiled)"
    return {"source": source, "linear_ms": lin / 1e3 / steps, "rest_ms": (tot - lin) / 1e3 / steps,
            "attention_ms": att / 1e3 / steps, "total_ms": tot / 1e3 / steps, "linear_names": top[:12]}


def three_way_report(splits: dict, row: dict) -> dict:
    """Each profiled variant's step as linear layers + attention + everything else (``--attention int8``:
    where the INT8 attention's gain comes from), and bf16 / variant."""
    out = {}
    for name, sp in splits.items():
        if sp is None:
            continue
        other = sp["total_ms"] - sp["linear_ms"] - sp["attention_ms"]
        out[name] = {"linear_ms": sp["linear_ms"], "attention_ms": sp["attention_ms"], "other_ms": other,
                     "total_ms": sp["total_ms"]}
        log(f"split {name:>12}: linear {sp['linear_ms']:8.2f} + attention {sp['attention_ms']:8.2f} + other "
            f"{other:8.2f} = {sp['total_ms']:8.2f} ms ({sp['source']})")
    b = out.get("bf16")
    for name, o in out.items():
        if b is None or name == "bf16":
            continue
        for part in ("linear_ms", "attention_ms", "other_ms"):
            o[part.replace("_ms", "_speedup")] = b[part] / o[part] if o[part] > 0 else float("nan")
        log(f"  bf16 / {name}: linear {o['linear_speedup']:.2f}x, attention {o['attention_speedup']:.2f}x, "
            f"other {o['other_speedup']:.2f}x; step (wall) {row['bf16'] / row[name]:.3f}x")
    return out


def split_report(splits: dict, row: dict) -> dict:
    """T_bf16 = T_linear + T_rest from the bf16 profile; a 2x faster linear part bounds the step speed-up
    at T_bf16 / (T_rest + T_linear / 2); the measured bf16 / int8 speed-up (wall time) as a share of it."""
    out = {}
    for suffix in ("", " compiled"):
        b, q = splits.get("bf16" + suffix), splits.get("int8" + suffix)
        if b is None or q is None:
            continue
        bound = b["total_ms"] / (b["rest_ms"] + b["linear_ms"] / 2) if b["total_ms"] > 0 else float("nan")
        speed = row["bf16" + suffix] / row["int8" + suffix]
        key = "compiled" if suffix else "eager"
        out[key] = {"source": b["source"], "linear_names_bf16": b["linear_names"],
                    "linear_names_int8": q["linear_names"],
                    "T_bf16": b["total_ms"], "T_linear": b["linear_ms"],
                    "T_rest": b["rest_ms"], "int8_T_linear": q["linear_ms"], "int8_T_rest": q["rest_ms"],
                    "bound_2x_linear": bound, "speedup": speed, "share_of_bound": speed / bound,
                    "linear_speedup": b["linear_ms"] / q["linear_ms"] if q["linear_ms"] > 0 else float("nan")}
        o = out[key]
        log(f"time split ({key}; {b['source']}): T_bf16 {o['T_bf16']:.2f} ms = T_linear {o['T_linear']:.2f} "
            f"+ T_rest {o['T_rest']:.2f}; int8: linear {o['int8_T_linear']:.2f} + rest {o['int8_T_rest']:.2f} "
            f"(linear {o['linear_speedup']:.2f}x)")
        log(f"  bound with 2x linears: {bound:.3f}x; measured {speed:.3f}x = {o['share_of_bound']:.0%} of it")
    return out


def time_call(call, dev, warmup: int, steps: int):
    """(median ms over ``steps`` calls after ``warmup``, last output)."""
    import torch
    times, out = [], None
    with torch.inference_mode():
        for i in range(warmup + steps):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            s = time.perf_counter()
            out = call()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times.append((time.perf_counter() - s) * 1e3)
    return statistics.median(times), out


def block_times(groups: dict, call, dev, steps: int) -> dict:
    """Median ms of one block of each kind ({kind: [modules]}), timed by forward hooks (CUDA events on a
    GPU, so the stream is not synchronised inside the step) over ``steps`` calls."""
    import torch
    marks = {k: [] for k in groups}
    handles = []

    def stamp():
        if dev.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    for kind, mods in groups.items():
        for mod in mods:
            pending = []
            handles.append(mod.register_forward_pre_hook(lambda m, a, p=pending: p.append(stamp())))
            handles.append(mod.register_forward_hook(
                lambda m, a, o, p=pending, k=kind: marks[k].append((p.pop(), stamp()))))
    try:
        with torch.inference_mode():
            for _ in range(steps):
                call()
    finally:
        for h in handles:
            h.remove()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        ms = {k: [a.elapsed_time(b) for a, b in v] for k, v in marks.items()}
    else:
        ms = {k: [(b - a) * 1e3 for a, b in v] for k, v in marks.items()}
    return {k: statistics.median(v) for k, v in ms.items() if v}


def random_like_module(module, device, dtype, seed: int) -> dict:
    """Random weights for every tensor of ``module``'s state dict (built on the meta device): matrices
    N(0, 1/in), norm scales near 1, biases and other vectors small."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, t in module.state_dict().items():
        shape = tuple(t.shape)
        if len(shape) >= 2:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            v = torch.randn(shape, generator=g, device=device) / fan_in ** 0.5
        elif k.endswith(("scale", "norm.weight", "layer_norm.weight")):
            v = 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
        else:
            v = 0.02 * torch.randn(shape, generator=g, device=device)
        sd[k] = v.to(dtype)
    return sd


def generic_lora(sd: dict, targets, rank: int, seed: int, dtype) -> dict:
    """PEFT-style LoRA (diffusion_model.<layer>.lora_A/B) over every 2-D weight whose layer name ends with
    one of ``targets``; B is not zero, so it changes the output."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in sd.items():
        base = k[:-len(".weight")]
        if not k.endswith(".weight") or w.ndim != 2 or not base.endswith(tuple("." + t for t in targets)):
            continue
        o, n = w.shape
        key = "diffusion_model." + base
        out[key + ".lora_A.weight"] = (torch.randn(rank, n, generator=g) / n ** 0.5).to(dtype)
        out[key + ".lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.2 / rank ** 0.5).to(dtype)
        out[key + ".alpha"] = torch.tensor(float(rank))
    return out


def flux_config(hidden: int, double: int, single: int) -> dict:
    """The dit_config ComfyUI's model_detection gives a Flux.1-dev state dict (guidance_in present)."""
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": hidden, "mlp_ratio": 4.0, "num_heads": hidden // 128,
            "depth": double, "depth_single_blocks": single, "axes_dim": [16, 56, 56], "theta": 10000,
            "qkv_bias": True, "guidance_embed": True}


def allow_narrow_flux():
    """ComfyUI's Flux detection fixes hidden_size 3072 / 24 heads; the dry run's narrow model takes its width
    from img_in.weight (head dim stays 128). A no-op for a model of the real width."""
    import comfy.model_detection as md
    orig = md.detect_unet_config
    if getattr(orig, "_ctq_narrow", False):
        return

    def detect(state_dict, key_prefix, metadata=None):
        cfg = orig(state_dict, key_prefix, metadata=metadata)
        w = state_dict.get(key_prefix + "img_in.weight")
        if cfg and cfg.get("image_model") == "flux" and w is not None and w.shape[0] != cfg["hidden_size"]:
            cfg["hidden_size"], cfg["num_heads"] = w.shape[0], w.shape[0] // 128
        return cfg
    detect._ctq_narrow = True
    md.detect_unet_config = detect


def with_lora_files(m, loras):
    """``m`` with ``loras`` through ``load_lora_for_models`` (what LoraLoaderModelOnly runs)."""
    import comfy.sd
    for lora in loras:
        m, _ = comfy.sd.load_lora_for_models(m, None, lora, 1.0, 0.0)
    return m


def compiled(m):
    """``m`` under TorchCompileModel's wrapper (inductor)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    m = m.clone()
    set_torch_compile_wrapper(model=m, backend="inductor")
    return m


def setup_common(args, kind: str):
    """Imports, device and dtype shared by the Flux and text-encoder benchmarks."""
    setup_imports(args.comfyui, cpu=args.dry_run)
    import torch
    import comfy.model_management as mm
    from convert_to_quant.kernels import triton_usable
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU (use --dry-run for the CPU smoke test)")
    dev = mm.get_torch_device()
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    log(f"device: {card}; torch {torch.__version__}; triton kernels: {triton_usable(dev)}; {kind}")
    return torch, mm, dev, dtype, card


def quantize_to_file(sd: dict, fmt: str, gen_dev: str, name: str, tmp: str):
    import torch
    from convert_to_quant.quant_core.formats import make_spec
    from convert_to_quant.quant_core.model_quant import plan_for_tensors, quantize_tensors
    from convert_to_quant.quant_core.plan import PlanOptions
    from convert_to_quant.quant_core.safetensors_io import save_file
    spec = {"int8_tensorwise": make_spec(), "convrot": make_spec(convrot=True, convrot_groupsize=256),
            "int8_blockwise": make_spec(scaling_mode="block", block_size=128)}[fmt]
    plan = plan_for_tensors(sd, PlanOptions(spec=spec, presets=("auto",)))
    qsd = quantize_tensors(sd, plan, device=torch.device(gen_dev))
    path = save_file(qsd, os.path.join(tmp, name))
    return path, len(plan.quantized_layers())


def _count(v: str) -> int:
    """argparse type: a whole number >= 0."""
    n = int(v)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def host_profile(call, dev, name: str, steps: int, top: int) -> dict:
    """Where a step's host (CPU) time goes: the time to *issue* one step with an idle GPU queue (no sync
    inside; median of ``steps``) against the step's wall time, and cProfile's functions with the most
    own time per step (cProfile slows Python down, so read those as shares, not absolute times)."""
    import cProfile
    import pstats
    import torch
    issue, wall = [], []
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(steps):
            sync()
            s = time.perf_counter()
            call()
            issue.append((time.perf_counter() - s) * 1e3)
            sync()
            wall.append((time.perf_counter() - s) * 1e3)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(steps):
            call()
        sync()
        pr.disable()
    st = pstats.Stats(pr)
    total = sum(v[2] for v in st.stats.values()) / steps * 1e3
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    out = {"issue_ms": statistics.median(issue), "wall_ms": statistics.median(wall), "profiled_own_ms": total,
           "top": [{"function": f"{os.path.basename(f)}:{line}:{fn}", "calls": v[1] / steps,
                    "own_ms": v[2] / steps * 1e3, "cum_ms": v[3] / steps * 1e3} for (f, line, fn), v in rows]}
    log(f"host profile {name}: issue {out['issue_ms']:.2f} ms / wall {out['wall_ms']:.2f} ms per step (idle queue "
        f"at the start); cProfile own time {total:.2f} ms per step, top {top}:")
    for r in out["top"]:
        log(f"    {r['own_ms']:7.3f} ms own {r['cum_ms']:8.3f} cum {r['calls']:6.0f} calls  {r['function']}")
    return out


def run_variants(args, mm, dev, variants, step, groups=None, split_names=("bf16", "int8")):
    """Times each (name, make) variant: ms/step, output, the profiled time split for ``split_names`` (and
    their compiled forms) and, where ``groups(obj)`` names block modules, per-block times (eager only)."""
    from convert_to_quant.nodes.ops import quant_linears
    row, outs, splits, blocks = {}, {}, {}, {}
    for name, make in variants:
        obj = make()
        patcher = getattr(obj, "patcher", obj)
        inner = getattr(obj, "cond_stage_model", None) or patcher.model
        if name.startswith("int8") and not quant_linears(inner):
            sys.exit("error: the int8 model has no int8 layers")
        mm.unload_all_models()
        mm.soft_empty_cache()
        if hasattr(obj, "cond_stage_model"):
            obj.load_model()  # as encode_from_tokens loads it (a forced full load here is redone every call)
        else:
            mm.load_models_gpu([patcher], force_full_load=True)
        call = lambda: step(obj)  # noqa: E731
        row[name], out = time_call(call, dev, args.warmup, args.steps)
        outs[name] = out.float()
        extra = ""
        if name.replace(" compiled", "") in split_names and not args.no_split:
            splits[name] = profile_split(call, dev)
        if args.host_profile and name in ("bf16", "int8"):
            host_profile(call, dev, name, max(args.steps, 3), args.host_profile)
        if groups is not None and "compiled" not in name:
            blocks[name] = block_times(groups(obj), call, dev, max(1, min(args.steps, 3)))
            extra = "  (one block: " + ", ".join(f"{k} {v:.2f} ms" for k, v in blocks[name].items()) + ")"
        log(f"{name:>22}: {row[name]:9.2f} ms{extra}")
        del obj, patcher, inner, call
    mm.unload_all_models()
    return row, outs, splits, blocks


def interleaved_rounds(args, mm, dev, variants, x, t, ctx, step_options):
    """Every variant loaded at once, then ``args.rounds`` rounds; in each, every variant (order rotated per
    round) runs ``args.steps`` steps after ``args.warmup`` in round 0. Returns per-variant medians over rounds
    of each round's median step, the last outputs, and per round's bf16 / int8 ratios."""
    import torch
    mm.unload_all_models()
    mm.soft_empty_cache()
    models = [(name, make()) for name, make in variants]
    mm.load_models_gpu([m for _, m in models], force_full_load=True)
    per = {name: [] for name, _ in models}
    outs = {}
    ratios = {"bf16/int8": []}
    with torch.inference_mode():
        for rnd in range(args.rounds):
            k = rnd % len(models)
            this = {}
            for name, m in models[k:] + models[:k]:
                opts = step_options(m)
                times = []
                for i in range((args.warmup if rnd == 0 else 0) + args.steps):
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    s0 = time.perf_counter()
                    out = m.model.apply_model(x, t, c_crossattn=ctx, transformer_options=opts)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    times.append((time.perf_counter() - s0) * 1e3)
                this[name] = statistics.median(times[-args.steps:])
                per[name].append(this[name])
                outs[name] = out.float()
            ratios["bf16/int8"].append(this["bf16"] / this["int8"])
    row = {name: statistics.median(v) for name, v in per.items()}
    for name, v in per.items():
        log(f"{name:>22}: {row[name]:9.2f} ms/step (median of {args.rounds} rounds; min {min(v):.2f}, max {max(v):.2f})")
    del models
    mm.unload_all_models()
    return row, outs, ratios


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def cosine(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def run_flux(args) -> int:
    if args.dry_run:
        hidden, text_tokens, res = 256, 8, {"tiny": (8, 8)}
        args.steps, args.warmup, args.lora_rank = 2, 1, 8
    else:
        hidden, text_tokens = 3072, args.text_tokens
        res = {}
        for r in args.flux_res.split(","):
            px = int(r) if r.strip().isdigit() else 0
            if px < 16 or px % 16:
                sys.exit(f"error: --flux-res {r!r} is not a multiple of 16 pixels (e.g. 1024)")
            res[f"image_{px}"] = (px // 8, px // 8)
    nd, ns = args.double_blocks, args.single_blocks
    torch, mm, dev, dtype, card = setup_common(args, "Flux.1-dev-shaped")
    import comfy.ldm.flux.model
    import comfy.ops
    import comfy.sd
    from convert_to_quant.nodes.loader import load_diffusion_model
    allow_narrow_flux()
    cfg = flux_config(hidden, nd, ns)
    log(f"model: Flux.1-dev-shaped, hidden {hidden}, {hidden // 128} heads, mlp ratio 4, {nd} double + {ns} single "
        f"blocks (Flux.1-dev: {FLUX_DEV_BLOCKS[0]} + {FLUX_DEV_BLOCKS[1]}); format {args.format}; "
        f"{args.loras} LoRA(s) of rank {args.lora_rank}; guidance {args.guidance}")

    t0 = time.time()
    gen_dev = "cuda" if dev.type == "cuda" else "cpu"
    with torch.device("meta"):
        skeleton = comfy.ldm.flux.model.Flux(**cfg, dtype=torch.bfloat16, device="meta",
                                             operations=comfy.ops.disable_weight_init)
    sd = random_like_module(skeleton, gen_dev, torch.bfloat16, seed=0)
    del skeleton
    tmp = tempfile.mkdtemp(prefix="ctq-bench-")
    qpath, nq = quantize_to_file(sd, args.format, gen_dev, "flux_int8.safetensors", tmp)
    sd = {k: v.cpu() for k, v in sd.items()}
    loras = [generic_lora(sd, FLUX_LORA_TARGETS, args.lora_rank, 10 + i, torch.bfloat16) for i in range(args.loras)]
    log(f"built and quantized in {time.time() - t0:.1f} s ({nq} int8 layers, "
        f"file {os.path.getsize(qpath) / 1e9:.2f} GB)")

    def bf16_model():
        m = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype})
        if m is None or type(m.model.diffusion_model).__name__ != "Flux":
            sys.exit("error: ComfyUI did not detect the state dict as Flux")
        return m

    def with_loras(m):
        return with_lora_files(m, loras)

    variants = [("bf16", bf16_model), ("bf16+loras", lambda: with_loras(bf16_model())),
                ("int8", lambda: load_diffusion_model(qpath, dtype)),
                ("int8+loras", lambda: with_loras(load_diffusion_model(qpath, dtype)))]
    if args.compile:
        variants += [("bf16 compiled", lambda: compiled(bf16_model())),
                     ("int8 compiled", lambda: compiled(load_diffusion_model(qpath, dtype))),
                     ("int8+loras compiled", lambda: compiled(with_loras(load_diffusion_model(qpath, dtype))))]

    def groups(m):
        dm = m.model.diffusion_model
        return {"double": list(dm.double_blocks), "single": list(dm.single_blocks)}

    results = {}
    for res_name, (lh, lw) in res.items():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, 16, lh, lw, generator=g).to(dev, dtype)
        t = torch.tensor([0.6], device=dev)
        ctx = torch.randn(1, text_tokens, 4096, generator=g).to(dev, dtype)
        y = torch.randn(1, 768, generator=g).to(dev, dtype)
        guidance = torch.tensor([args.guidance], device=dev)
        tokens = (lh // 2) * (lw // 2)

        def step(m):
            opts = {"wrappers": m.wrappers} if m.wrappers else {}
            return m.model.apply_model(x, t, c_crossattn=ctx, y=y, guidance=guidance, transformer_options=opts)

        log(f"\n== {res_name}: {tokens} image + {text_tokens} text tokens, batch 1, distilled guidance ==")
        row, outs, splits, blocks = run_variants(args, mm, dev, variants, step, groups)
        r = {"image_tokens": tokens, "text_tokens": text_tokens, "ms": row, "block_ms": blocks,
             "speedup_bf16_over_int8": row["bf16"] / row["int8"],
             "lora_overhead_int8": row["int8+loras"] / row["int8"],
             "lora_overhead_bf16": row["bf16+loras"] / row["bf16"],
             "rel_err_int8_vs_bf16": rel_err(outs["int8"], outs["bf16"]),
             "rel_err_int8_loras_vs_bf16_loras": rel_err(outs["int8+loras"], outs["bf16+loras"]),
             "lora_effect_bf16": rel_err(outs["bf16+loras"], outs["bf16"])}
        # Flux.1-dev per step: the measured step with the block count scaled to 19 + 38 (blocks of a kind are
        # identical); compiled variants scaled by their eager model's ratio
        est = {}
        for name in row:
            eager = name.replace(" compiled", "")
            bt = blocks.get(eager)
            if not bt:
                continue
            full = row[eager] + (FLUX_DEV_BLOCKS[0] - nd) * bt["double"] + (FLUX_DEV_BLOCKS[1] - ns) * bt["single"]
            est[name] = row[name] * full / row[eager]
        r["est_flux_dev_ms"] = est
        log("Flux.1-dev (19 double + 38 single) est. ms/step: " + ", ".join(f"{k} {v:.1f}" for k, v in est.items()))
        if "bf16" in est and "int8" in est:
            r["est_flux_dev_speedup"] = est["bf16"] / est["int8"]
            log(f"  est. full-model speed-up bf16 -> int8: {r['est_flux_dev_speedup']:.3f}x "
                f"(this {nd}+{ns}-block model: {r['speedup_bf16_over_int8']:.3f}x; target >= 1.3)")
        if args.compile:
            r["speedup_compiled"] = row["bf16 compiled"] / row["int8 compiled"]
            r["lora_overhead_int8_compiled"] = row["int8+loras compiled"] / row["int8 compiled"]
        log(f"int8 + {args.loras} LoRAs / int8: {r['lora_overhead_int8']:.3f} (target <= 1.10); "
            f"stock bf16 + LoRAs / bf16: {r['lora_overhead_bf16']:.3f}")
        log(f"output error vs bf16: int8 {r['rel_err_int8_vs_bf16']:.4f}, with LoRAs "
            f"{r['rel_err_int8_loras_vs_bf16_loras']:.4f} (LoRA effect {r['lora_effect_bf16']:.4f})")
        r["time_split"] = split_report(splits, row)
        results[res_name] = r
    log("\nRESULT " + json.dumps({"model": "flux", "device": card, "hidden": hidden, "double_blocks": nd,
                                  "single_blocks": ns, "format": args.format, "loras": args.loras,
                                  "lora_rank": args.lora_rank, "guidance": args.guidance, "shapes": results}))
    os.unlink(qpath)
    os.rmdir(tmp)
    return 0


class _T5Shape:
    """ComfyUI builds T5-XXL from its fixed 24-layer config and detects it by block 23; for a T5-XXL-shaped
    encoder with fewer layers (or a narrow one in the dry run) both the stock and our loader get the layer
    count / width through ComfyUI's own ``t5xxl_model_config`` option, and detection is told it is T5-XXL."""

    def __init__(self, config: dict):
        self.config = config

    def __enter__(self):
        import comfy.sd
        self.orig_load, self.orig_detect = comfy.sd.load_text_encoder_state_dicts, comfy.sd.detect_te_model
        cfg = self.config

        def load(state_dicts=[], embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                 model_options={}):
            model_options = {**model_options, "t5xxl_model_config": dict(cfg)}
            return self.orig_load(state_dicts=state_dicts, embedding_directory=embedding_directory,
                                  clip_type=clip_type, model_options=model_options)

        def detect(sd):
            if "encoder.block.0.layer.1.DenseReluDense.wi_1.weight" in sd:
                return comfy.sd.TEModel.T5_XXL
            return self.orig_detect(sd)
        comfy.sd.load_text_encoder_state_dicts, comfy.sd.detect_te_model = load, detect
        return self

    def __exit__(self, *exc):
        import comfy.sd
        comfy.sd.load_text_encoder_state_dicts, comfy.sd.detect_te_model = self.orig_load, self.orig_detect


def run_text_encoder(args) -> int:
    if args.dry_run:
        d_model, d_ff, heads, layers, tokens = 256, 512, 4, 2, 16
        args.steps, args.warmup = 2, 1
    else:
        d_model, d_ff, heads, layers, tokens = 4096, 10240, 64, args.te_layers, args.text_tokens
    torch, mm, dev, dtype, card = setup_common(args, "T5-XXL-shaped text encoder")
    import comfy.ops
    import comfy.sd
    import comfy.text_encoders.t5
    from convert_to_quant.nodes.loader import load_text_encoder
    with open(os.path.join(args.comfyui, "comfy", "text_encoders", "t5_config_xxl.json")) as f:
        config = json.load(f)
    config.update({"d_model": d_model, "d_ff": d_ff, "num_heads": heads, "d_kv": d_model // heads,
                   "num_layers": layers})
    log(f"model: T5-XXL-shaped encoder, d_model {d_model}, d_ff {d_ff}, {heads} heads, gated-gelu, {layers} "
        f"layers (T5-XXL: {T5_XXL_LAYERS}); {tokens} tokens; format {args.format}")
    t0 = time.time()
    gen_dev = "cuda" if dev.type == "cuda" else "cpu"
    skeleton = comfy.text_encoders.t5.T5(config, torch.bfloat16, "meta", comfy.ops.disable_weight_init)
    sd = random_like_module(skeleton, gen_dev, torch.bfloat16, seed=0)
    del skeleton
    for k in sd:  # T5 has no 1/sqrt(d_kv) in its attention: trained (and initialised) q weights carry it
        if k.endswith("SelfAttention.q.weight"):
            sd[k] = (sd[k].float() / config["d_kv"] ** 0.5).to(torch.bfloat16)
    tmp = tempfile.mkdtemp(prefix="ctq-bench-")
    qpath, nq = quantize_to_file(sd, args.format, gen_dev, "t5_int8.safetensors", tmp)
    sd = {k: v.cpu() for k, v in sd.items()}
    log(f"built and quantized in {time.time() - t0:.1f} s ({nq} int8 layers, "
        f"file {os.path.getsize(qpath) / 1e9:.2f} GB)")
    clip_type = comfy.sd.CLIPType.SD3  # T5-XXL alone, 512-token prompts as Flux / SD3 use it

    def stock():
        with _T5Shape(config):
            return comfy.sd.load_text_encoder_state_dicts(state_dicts=[dict(sd)], clip_type=clip_type,
                                                          model_options={"dtype": dtype})

    def ours(activations):
        def load():
            with _T5Shape(config):
                return load_text_encoder(qpath, clip_type, dtype, activations=activations)
        return load

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, config["vocab_size"], (tokens - 1,), generator=g).tolist() + [1]
    toks = {"l": [], "g": [], "t5xxl": [[(i, 1.0) for i in ids]]}

    def step(clip):  # CLIPTextEncode's forward, without encode_from_tokens' per-call load bookkeeping
        return clip.cond_stage_model.encode_token_weights(toks)[0]

    def groups(clip):
        return {"layer": list(clip.cond_stage_model.t5xxl.transformer.encoder.block)}

    log(f"\n== one forward, {tokens} tokens ==")
    variants = [("bf16", stock), ("int8", ours(args.te_activations))]
    if args.te_activations == "bf16":  # the loader's default; also time the fast W8A8 mode beside it
        variants.append(("int8_w8a8", ours("int8")))
    row, outs, splits, blocks = run_variants(args, mm, dev, variants, step, groups)
    est = {k: row[k] + (T5_XXL_LAYERS - layers) * blocks[k]["layer"] for k in row if blocks.get(k)}
    r = {"model": "t5xxl", "device": card, "d_model": d_model, "d_ff": d_ff, "heads": heads, "layers": layers,
         "tokens": tokens, "format": args.format, "ms": row, "layer_ms": blocks, "est_t5_xxl_ms": est,
         "speedup_bf16_over_int8": row["bf16"] / row["int8"],
         "cosine_int8_vs_bf16": cosine(outs["int8"], outs["bf16"]),
         "rel_err_int8_vs_bf16": rel_err(outs["int8"], outs["bf16"])}
    log(f"ms per forward: bf16 {row['bf16']:.2f}, int8 {row['int8']:.2f}; speed-up {r['speedup_bf16_over_int8']:.3f}x")
    if "bf16" in est and "int8" in est:
        r["est_speedup_24_layers"] = est["bf16"] / est["int8"]
        log(f"T5-XXL ({T5_XXL_LAYERS} layers) est. ms per forward: bf16 {est['bf16']:.1f}, int8 {est['int8']:.1f} "
            f"({r['est_speedup_24_layers']:.3f}x)")
    log(f"output vs bf16: cosine {r['cosine_int8_vs_bf16']:.5f}, rel. error {r['rel_err_int8_vs_bf16']:.4f} "
        f"(activations {args.te_activations})")
    if "int8_w8a8" in outs:
        r["ms_int8_w8a8"] = row["int8_w8a8"]
        r["cosine_int8_w8a8_vs_bf16"] = cosine(outs["int8_w8a8"], outs["bf16"])
        log(f"activations int8 (W8A8): {row['int8_w8a8']:.2f} ms ({row['bf16'] / row['int8_w8a8']:.3f}x), cosine "
            f"{r['cosine_int8_w8a8_vs_bf16']:.5f}")
    r["time_split"] = split_report(splits, row)
    log("\nRESULT " + json.dumps(r))
    os.unlink(qpath)
    os.rmdir(tmp)
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
                    help=f"comma list of {', '.join(SHAPES)} (--dry-run with --comfyui: tiny, tiny_273)")
    ap.add_argument("--format", choices=["int8_tensorwise", "int8_pertensor", "convrot", "int8_blockwise", "all"],
                    default="int8_tensorwise",
                    help="int8_tensorwise: per-row scales; int8_pertensor: one scale (CPU fallback benchmark only); "
                         "all: every format of the CPU fallback benchmark in one interleaved run")
    ap.add_argument("--loras", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=None, help="default 10 (dry run: 2; fallback benchmark: 41 rounds)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (dry run: 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="wan with --comfyui: load every variant at once and time them in R interleaved rounds of "
                         "--steps steps each (order rotated per round); per variant the median over rounds, and the "
                         "median (q1-q3) of each round's bf16 / int8 ratio. For CPU runs, where a machine's load "
                         "drifts between sequential variants; needs memory for all variants")
    ap.add_argument("--compile", action="store_true", help="also time both models under TorchCompileModel (inductor)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model: checks this script end to end")
    ap.add_argument("--model", choices=["wan", "flux"], default="wan",
                    help="wan: Wan-2.1-shaped video DiT (batch 2, CFG); flux: Flux.1-dev-shaped (batch 1, guidance)")
    ap.add_argument("--double-blocks", type=int, default=2, help="flux: double-stream blocks (Flux.1-dev: 19)")
    ap.add_argument("--single-blocks", type=int, default=4, help="flux: single-stream blocks (Flux.1-dev: 38)")
    ap.add_argument("--flux-res", default="1024", help="flux: comma list of square image sizes in pixels")
    ap.add_argument("--guidance", type=float, default=3.5, help="flux: distilled guidance value")
    ap.add_argument("--text-encoder", action="store_true",
                    help="instead of a diffusion model: a T5-XXL-shaped encoder, ours int8 vs ComfyUI's T5 bf16, "
                         "--text-tokens tokens")
    ap.add_argument("--te-activations", choices=["bf16", "int8"], default="bf16",
                    help="text encoder: the loader's activations mode (bf16: W8A16, its default; int8: W8A8)")
    ap.add_argument("--te-layers", type=int, default=4, help="--text-encoder: encoder layers (T5-XXL: 24)")
    ap.add_argument("--no-split", action="store_true", help="skip the profiled linear / rest time split")
    ap.add_argument("--host-profile", type=_count, default=0, metavar="N",
                    help="flux / text encoder: for bf16 and int8, the host time to issue a step and the N Python "
                         "functions with the most own time per step (cProfile)")
    ap.add_argument("--attention", choices=["default", "int8"], default="default",
                    help="wan: int8 adds a variant 'int8+attn8' (int8 weights + INT8 attention, the loader's "
                         "attention=int8 option) and a linear / attention / other split of the profiled steps")
    ap.add_argument("--kernel-table", type=int, default=0, metavar="N",
                    help="wan: print the N device kernels that take the most time per step for the variants "
                         "in --kernel-table-variants (where a variant's extra time goes)")
    ap.add_argument("--kernel-table-variants", default="int8,int8+loras,int8 compiled,int8+loras compiled")
    args = ap.parse_args(argv)
    if args.text_encoder or args.model == "flux":
        args.steps = args.steps if args.steps is not None else (2 if args.dry_run else 10)
        args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3)
    for name in ("double_blocks", "single_blocks", "te_layers", "steps", "rounds"):
        if getattr(args, name) is None:
            continue
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least 1")
    fallback_bench = args.dry_run and not args.comfyui and not args.text_encoder and args.model == "wan"
    if args.rounds > 1 and (not args.comfyui or args.model != "wan" or args.text_encoder):
        sys.exit("error: --rounds is for the Wan step in ComfyUI (--comfyui, --model wan)")
    if args.format in ("int8_pertensor", "all") and not fallback_bench:
        sys.exit(f"error: --format {args.format} is for the CPU fallback benchmark (--dry-run without --comfyui)")
    if args.text_encoder:
        return run_text_encoder(args)
    if args.model == "flux":
        return run_flux(args)

    dry = (256, 512, 2, 2, 1) if args.dry_run else (5120, 13824, 4, 10, 3)
    if args.dry_run and not args.comfyui:
        dry = (256, 512, 2, 41, 3)  # rounds of interleaved steps: medians stable to ~1% at 20 ms steps
    for name, v in zip(("dim", "ffn", "blocks", "steps", "warmup"), dry):
        if getattr(args, name) is None:
            setattr(args, name, v)
    if args.dry_run:
        args.text_tokens, args.lora_rank = 8, 8
        if not args.comfyui:
            return torch_fallback_bench(args)
        # ComfyUI on the CPU: "tiny" (4 tokens), or --shapes tiny_273 (the CPU step of issue 13)
        dry_shapes = {**DRY_SHAPES, **TORCH_DRY_SHAPES}
        shapes = {s: dry_shapes[s] for s in args.shapes.split(",") if s in dry_shapes} or DRY_SHAPES
    else:
        if not args.comfyui:
            sys.exit("error: --comfyui is required (only --dry-run runs without ComfyUI)")
        shapes = {}
        for s in args.shapes.split(","):
            if s not in SHAPES:
                sys.exit(f"error: unknown shape {s!r}; known: {', '.join(SHAPES)}")
            shapes[s] = SHAPES[s]
    torch, mm, dev, dtype, card = setup_common(args, "Wan-2.1-shaped")
    import comfy.sd
    from convert_to_quant.nodes.attention import with_attention
    from convert_to_quant.nodes.loader import load_diffusion_model
    from convert_to_quant.nodes.ops import quant_linears
    from convert_to_quant.quant_core.formats import make_spec
    from convert_to_quant.quant_core.model_quant import plan_for_tensors, quantize_tensors
    from convert_to_quant.quant_core.plan import PlanOptions
    from convert_to_quant.quant_core.safetensors_io import save_file

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
        return with_lora_files(m, loras)

    def time_steps(patcher, x, t, ctx):
        mm.unload_all_models()
        mm.soft_empty_cache()
        mm.load_models_gpu([patcher], force_full_load=True)
        opts = step_options(patcher)
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

    def step_options(patcher):
        """transformer_options of a sampling step: the model options' (the attention override lives there)
        plus the patcher's wrappers (TorchCompileModel)."""
        opts = dict(patcher.model_options.get("transformer_options", {}))
        if patcher.wrappers:
            opts["wrappers"] = patcher.wrappers
        return opts

    results = {}
    kernel_tables = set(args.kernel_table_variants.split(",")) if args.kernel_table else set()
    lora_v = args.loras > 0
    variants = [("bf16", lambda: bf16_model())] + ([("bf16+loras", lambda: with_loras(bf16_model()))] if lora_v else [])
    variants += [("int8", lambda: int8_model())] + ([("int8+loras", lambda: with_loras(int8_model()))] if lora_v else [])
    attn8 = args.attention == "int8"
    if attn8:
        variants += [("int8+attn8", lambda: with_attention(int8_model(), "int8"))]
    if args.compile:
        variants += [("bf16 compiled", lambda: compiled(bf16_model())), ("int8 compiled", lambda: compiled(int8_model()))]
        variants += [("int8+loras compiled", lambda: compiled(with_loras(int8_model())))] if lora_v else []
        variants += [("int8+attn8 compiled", lambda: compiled(with_attention(int8_model(), "int8")))] if attn8 else []
    for shape_name, (f, h, w) in shapes.items():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 16, f, 2 * h, 2 * w, generator=g).to(dev, dtype)
        t = torch.tensor([0.6, 0.6], device=dev)
        ctx = torch.randn(2, args.text_tokens, 4096, generator=g).to(dev, dtype)
        tokens = f * h * w
        log(f"\n== {shape_name}: {tokens} tokens per sample, batch 2 (cond + uncond) ==")
        row, outs, splits = {}, {}, {}
        if args.rounds > 1:
            row, outs, rr = interleaved_rounds(args, mm, dev, variants, x, t, ctx, step_options)
        for name, make in (variants if args.rounds == 1 else ()):
            m = make()
            if name.startswith("int8") and not quant_linears(m.model):
                sys.exit("error: the int8 model has no int8 layers")
            ms, out = time_steps(m, x, t, ctx)
            row[name], outs[name] = ms, out
            if name.replace(" compiled", "") in ("bf16", "int8", "int8+attn8") and not args.no_split:
                splits[name] = profile_split(lambda: m.model.apply_model(
                    x, t, c_crossattn=ctx, transformer_options=step_options(m)), dev)
            log(f"{name:>22}: {ms:9.2f} ms/step")
            if name in kernel_tables:
                kernel_table(lambda: m.model.apply_model(x, t, c_crossattn=ctx, transformer_options=step_options(m)),
                             dev, name, args.kernel_table)
            del m
        mm.unload_all_models()

        def err(a, b):
            return float((outs[a] - outs[b]).norm() / outs[b].norm())
        r = {"tokens": tokens, "ms": row,
             "speedup_bf16_over_int8": row["bf16"] / row["int8"],
             "rel_err_int8_vs_bf16": err("int8", "bf16")}
        if args.rounds > 1:
            r["rounds"] = rr
            _, q1, med, q3, _ = quartiles(rr["bf16/int8"])
            log(f"{args.rounds} interleaved rounds of {args.steps} steps: bf16 / int8 per round median {med:.3f} "
                f"(q1-q3 {q1:.3f}-{q3:.3f}); medians over rounds above")
        if lora_v:
            r.update(lora_overhead_int8=row["int8+loras"] / row["int8"], lora_overhead_bf16=row["bf16+loras"] / row["bf16"],
                     rel_err_int8_loras_vs_bf16_loras=err("int8+loras", "bf16+loras"),
                     lora_effect_bf16=err("bf16+loras", "bf16"))
        if args.compile:
            r["speedup_compiled"] = row["bf16 compiled"] / row["int8 compiled"]
            if lora_v:
                r["lora_overhead_int8_compiled"] = row["int8+loras compiled"] / row["int8 compiled"]
        results[shape_name] = r
        log(f"speed-up bf16 -> int8: {r['speedup_bf16_over_int8']:.3f}x (target >= 1.3)")
        if attn8:
            r["speedup_bf16_over_int8_attn8"] = row["bf16"] / row["int8+attn8"]
            r["rel_err_int8_attn8_vs_bf16"] = err("int8+attn8", "bf16")
            r["rel_err_int8_attn8_vs_int8"] = err("int8+attn8", "int8")
            log(f"speed-up bf16 -> int8 weights + INT8 attention: {r['speedup_bf16_over_int8_attn8']:.3f}x "
                f"(target >= 1.45); output rel error vs bf16 {r['rel_err_int8_attn8_vs_bf16']:.4f}, vs int8 "
                f"{r['rel_err_int8_attn8_vs_int8']:.4f}")
            if args.compile:
                r["speedup_compiled_attn8"] = row["bf16 compiled"] / row["int8+attn8 compiled"]
                log(f"compiled: bf16 -> int8 + INT8 attention {r['speedup_compiled_attn8']:.3f}x")
        if lora_v:
            log(f"int8 + {args.loras} LoRAs / int8: {r['lora_overhead_int8']:.3f} (target <= 1.10); "
                f"stock bf16 + LoRAs / bf16: {r['lora_overhead_bf16']:.3f}")
            log(f"output error vs bf16: int8 {r['rel_err_int8_vs_bf16']:.4f}, with LoRAs "
                f"{r['rel_err_int8_loras_vs_bf16_loras']:.4f} (LoRA effect {r['lora_effect_bf16']:.4f})")
        if args.compile:
            log(f"compiled: speed-up {r['speedup_compiled']:.3f}x"
                + (f", LoRA overhead {r['lora_overhead_int8_compiled']:.3f}" if lora_v else ""))
        r["time_split"] = split_report(splits, row)
        if attn8:
            r["time_split_3way"] = three_way_report(splits, row)
    log("\nRESULT " + json.dumps({"device": card, "dim": args.dim, "ffn": args.ffn, "blocks": args.blocks,
                                  "format": args.format, "loras": args.loras, "lora_rank": args.lora_rank,
                                  "attention": args.attention,
                                  "shapes": results}))
    os.unlink(qpath)
    os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
