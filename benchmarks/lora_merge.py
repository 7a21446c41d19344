"""Cost of LoRA merging on Flux.1-dev-sized layers, against reading the weight as float32 (the baseline
every merged tensor pays anyway).

    python benchmarks/lora_merge.py [--rank 32] [--repeat 3]

Builds the header of a Flux.1-dev transformer (19 double, 38 single blocks, hidden 3072, no weights are
allocated for it) and a diffusers-style LoRA on every attention projection and the single blocks' MLP
input (q/k/v land on rows of the fused weights). Prints the time to parse + bind (match and validate
everything) and, per layer shape, the time of ``apply`` vs a plain bf16 -> float32 copy, as a ratio.
"""
from __future__ import annotations

import argparse
import time

import torch

from convert_to_quant.quant_core.lora import LoraMerger


def flux_header(h=3072, mlp=12288):
    shapes = {}
    for i in range(19):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            shapes[p + "attn.qkv.weight"] = (3 * h, h)
            shapes[p + "attn.qkv.bias"] = (3 * h,)
            shapes[p + "attn.proj.weight"] = (h, h)
            shapes[p + "mlp.0.weight"] = (mlp, h)
            shapes[p + "mlp.2.weight"] = (h, mlp)
            shapes[p + "mod.lin.weight"] = (6 * h, h)
    for i in range(38):
        shapes[f"single_blocks.{i}.linear1.weight"] = (3 * h + mlp, h)
        shapes[f"single_blocks.{i}.linear2.weight"] = (h, h + mlp)
        shapes[f"single_blocks.{i}.modulation.lin.weight"] = (3 * h, h)
    return {k: (torch.bfloat16, v) for k, v in shapes.items()}


def flux_lora(rank, h=3072, mlp=12288):
    g = torch.Generator().manual_seed(0)
    sd = {}

    def pair(name, out):
        sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, h, generator=g) * 0.01).to(torch.bfloat16)
        sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * 0.01).to(torch.bfloat16)
    for i in range(19):
        for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            pair(f"transformer_blocks.{i}.attn.{p}", h)
    for i in range(38):
        for p in ("attn.to_q", "attn.to_k", "attn.to_v"):
            pair(f"single_transformer_blocks.{i}.{p}", h)
        pair(f"single_transformer_blocks.{i}.proj_mlp", mlp)
    return sd


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    header = flux_header()
    lora = flux_lora(args.rank)
    t = time.perf_counter()
    merger = LoraMerger.from_state_dicts([lora], [1.0])
    report = merger.bind(header)
    print(f"parse + bind: {time.perf_counter() - t:.2f} s for {report.matched_modules} modules onto "
          f"{len(header)} tensors ({len(report.changed_keys)} changed), rank {args.rank}, "
          f"{torch.get_num_threads()} threads")
    for key in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight",
                "single_blocks.0.linear1.weight"):
        w = torch.randn(header[key][1]).to(torch.bfloat16)
        base = best_of(lambda: w.to(torch.float32), args.repeat)
        merged = best_of(lambda: merger.apply(key, w), args.repeat)
        print(f"{key} {list(w.shape)}: apply {merged * 1e3:.1f} ms, bf16->fp32 copy {base * 1e3:.1f} ms, "
              f"ratio {merged / base:.2f}")


if __name__ == "__main__":
    main()
