"""Small builders for test inputs (test data is made by the tests)."""
import hashlib
import os

import torch

from convert_to_quant.quant_core.safetensors_io import save_file


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def heavy_tailed(shape, scale=0.02, df=5, seed=0, outlier_cols=0):
    """Student-t(df) weights (heavy-tailed like real transformer weights) times ``scale``, optionally with
    a few outlier input columns."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn((df,) + tuple(shape), generator=g).pow(2).sum(0)
    w = z / torch.sqrt(chi2 / df) * scale
    if outlier_cols:
        cols = torch.randperm(shape[-1], generator=g)[:outlier_cols]
        w[..., cols] *= 8.0
    return w


def write_model(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def tiny_dit(dtype=torch.bfloat16, width=256, blocks=2, seed=0):
    """A small Flux-like key set with realistic names (double/single blocks, embedders, norms, biases)."""
    g = torch.Generator().manual_seed(seed)

    def w(o, i):
        return (torch.randn(o, i, generator=g) * 0.02).to(dtype)

    def b(n):
        return (torch.randn(n, generator=g) * 0.01).to(dtype)

    sd = {"img_in.weight": w(width, 64), "img_in.bias": b(width),
          "txt_in.weight": w(width, 128), "txt_in.bias": b(width),
          "time_in.in_layer.weight": w(width, 256), "time_in.in_layer.bias": b(width),
          "final_layer.linear.weight": w(64, width), "final_layer.linear.bias": b(64)}
    for i in range(blocks):
        p = f"double_blocks.{i}."
        sd[p + "img_attn.qkv.weight"] = w(3 * width, width)
        sd[p + "img_attn.qkv.bias"] = b(3 * width)
        sd[p + "img_attn.proj.weight"] = w(width, width)
        sd[p + "img_attn.norm.query_norm.scale"] = torch.ones(width // 4, dtype=dtype)
        sd[p + "img_mlp.0.weight"] = w(4 * width, width)
        sd[p + "img_mlp.2.weight"] = w(width, 4 * width)
        sd[p + "img_mod.lin.weight"] = w(6 * width, width)
        p = f"single_blocks.{i}."
        sd[p + "linear1.weight"] = w(7 * width, width)
        sd[p + "linear2.weight"] = w(width, 5 * width)
        sd[p + "norm.key_norm.scale"] = torch.ones(width // 4, dtype=dtype)
    return sd
