"""LoRA merging: key formats, ComfyUI's math, PEFT equivalence, fused targets, errors.

References are built independently in the tests: PEFT's own ``merge_and_unload`` on real MiniLM weights,
and float64 formulas written out per adapter type (loops / explicit row slices, not our code path)."""
import json
import math
import os
import sys

import pytest
import torch

from convert_to_quant.quant_core.errors import LoRAError
from convert_to_quant.quant_core.lora import LoraMerger, merge_state_dict
from convert_to_quant.quant_core.lora_keys import BaseIndex, flat, split_lora_key
from convert_to_quant.quant_core.safetensors_io import load_file, read_header, save_file


def _infos(sd):
    return {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()}


def _merge(base, loras, strengths=1.0, metadata=None, **kw):
    m = LoraMerger.from_state_dicts(loras, strengths, metadata=metadata, **kw)
    rep = m.bind(_infos(base))
    return {k: m.apply(k, v) for k, v in base.items()}, rep, m


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


# ------------------------------------------------------------------------------------------------
# PEFT on real MiniLM weights
# ------------------------------------------------------------------------------------------------
def _import_hf():
    """Import transformers and peft. The repository root (on sys.path under ``python -m pytest``) has a
    ``kernels`` package, which transformers takes for the Hugging Face ``kernels`` package and fails to
    import; hide the root while transformers probes for it (the probe's answer is cached)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    try:
        transformers = pytest.importorskip("transformers")
        peft = pytest.importorskip("peft")
        from transformers.utils import import_utils
        if hasattr(import_utils, "is_kernels_available"):
            import_utils.is_kernels_available()
        import transformers.modeling_utils  # noqa: F401
    finally:
        sys.path[:] = saved
    return transformers, peft


def _peft_minilm(minilm_path, tmp_path, **cfg_kw):
    """A PEFT LoRA on MiniLM with random non-zero A and B, saved with ``save_pretrained``; returns the
    adapter folder, PEFT's merged state dict and the config."""
    transformers, peft = _import_hf()
    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(os.path.dirname(minilm_path))
    cfg = peft.LoraConfig(**cfg_kw)
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path / "adapter"
    pm.save_pretrained(str(out))
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return out, merged, cfg


PEFT_CFG = dict(r=4, lora_alpha=7, target_modules=["query", "key", "value", "dense"],
                rank_pattern={"encoder.layer.1.attention.self.query": 8, "intermediate.dense": 2},
                alpha_pattern={"value": 3.0, "encoder.layer.2.output.dense": 11.0})


def _check_against_peft(base, merged_by_us, merged_by_peft, n_expected_changed):
    changed = 0
    assert set(merged_by_peft) <= set(base)
    for k, v in base.items():
        ours = merged_by_us[k]
        if k not in merged_by_peft:  # buffers transformers does not save (position_ids)
            assert ours is v
            continue
        theirs = merged_by_peft[k]
        if not torch.equal(ours.to(v.dtype), v):
            changed += 1
        if v.is_floating_point():
            assert _rel(ours, theirs) <= 1e-5, k
    assert changed == n_expected_changed


@pytest.fixture(scope="module")
def peft_lora(minilm_path, tmp_path_factory):
    return _peft_minilm(minilm_path, tmp_path_factory.mktemp("peft"), **PEFT_CFG)


def test_peft_lora_on_minilm_equals_merge_and_unload(minilm_path, peft_lora):
    folder, peft_merged, cfg = peft_lora
    base = load_file(minilm_path)
    # PEFT's own layout: adapter_model.safetensors (no alpha in it) + adapter_config.json beside it
    m = LoraMerger.from_files([str(folder / "adapter_model.safetensors")], [1.0])
    rep = m.bind(_infos(base))
    n_modules = 6 * 6 + 1  # 6 layers x (q, k, v, attn out, intermediate, output) + pooler.dense
    assert rep.matched_modules == n_modules and rep.unmatched == []
    assert rep.files[0].alpha_sources == {"metadata": n_modules}
    ours = {k: m.apply(k, v) for k, v in base.items()}
    _check_against_peft(base, ours, peft_merged, n_modules)
    # rank_pattern / alpha_pattern took effect (scales differ between modules)
    mods = m.files[0].modules
    q1 = mods["base_model.model.encoder.layer.1.attention.self.query"]
    v0 = mods["base_model.model.encoder.layer.0.attention.self.value"]
    o2 = mods["base_model.model.encoder.layer.2.output.dense"]
    assert (q1.rank, q1.scale) == (8, 7 / 8) and v0.scale == 3 / 4 and o2.scale == 11 / 4


def _peft_to_styles(folder, cfg):
    """The saved PEFT LoRA rewritten in other key styles, with the same alphas."""
    sd = load_file(str(folder / "adapter_model.safetensors"))
    mods = {}
    for k, v in sd.items():
        mod, role, _ = split_lora_key(k)
        mods.setdefault(mod[len("base_model.model."):], {})[role] = v
    alphas = {}
    m = LoraMerger.from_files([str(folder / "adapter_model.safetensors")])
    for name, mod in m.files[0].modules.items():
        alphas[name[len("base_model.model."):]] = mod.alpha
    kohya, comfy, peft_default = {}, {}, {}
    for name, t in mods.items():
        a = torch.tensor(alphas[name], dtype=torch.float32)
        kohya[f"lora_te_{flat(name)}.lora_down.weight"] = t["down"]
        kohya[f"lora_te_{flat(name)}.lora_up.weight"] = t["up"]
        kohya[f"lora_te_{flat(name)}.alpha"] = a
        comfy[f"text_encoders.minilm.{name}.lora_down.weight"] = t["down"]
        comfy[f"text_encoders.minilm.{name}.lora_up.weight"] = t["up"]
        comfy[f"text_encoders.minilm.{name}.alpha"] = a
        peft_default[f"base_model.model.{name}.lora_A.default.weight"] = t["down"]
        peft_default[f"base_model.model.{name}.lora_B.default.weight"] = t["up"]
    return kohya, comfy, peft_default


def _cfg_dict(cfg):
    d = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, set):
            v = sorted(v)
        d[k] = v if isinstance(v, (str, int, float, bool, list, dict, type(None))) else str(v)
    return d


def test_peft_lora_in_kohya_comfy_and_metadata_styles_merges_identically(minilm_path, peft_lora, tmp_path):
    folder, peft_merged, cfg = peft_lora
    base = load_file(minilm_path)
    kohya, comfy, peft_default = _peft_to_styles(folder, cfg)
    meta = {"lora_adapter_metadata": json.dumps(_cfg_dict(cfg))}
    paths = {}
    for name, sd, md in (("kohya", kohya, None), ("comfy", comfy, None), ("peft_default", peft_default, meta)):
        paths[name] = save_file(sd, str(tmp_path / f"{name}.safetensors"), metadata=md)
    results = {}
    for name, p in paths.items():
        m = LoraMerger.from_files([p], 1.0)
        rep = m.bind(_infos(base))
        assert rep.matched_modules == 37 and rep.unmatched == [], name
        want_src = "metadata" if name == "peft_default" else "tensor"
        assert rep.files[0].alpha_sources == {want_src: 37}, name
        results[name] = {k: m.apply(k, v) for k, v in base.items()}
    for k in base:
        assert torch.equal(results["kohya"][k], results["comfy"][k]), k
        assert torch.equal(results["kohya"][k], results["peft_default"][k]), k
    _check_against_peft(base, results["kohya"], peft_merged, 37)


@pytest.mark.parametrize("extra", [dict(use_dora=True), dict(use_rslora=True), dict(lora_bias=True)],
                         ids=["dora", "rslora", "lora_bias"])
def test_peft_variants_equal_merge_and_unload(minilm_path, tmp_path, extra):
    _, peft = _import_hf()
    if extra.get("lora_bias") and "lora_bias" not in peft.LoraConfig.__dataclass_fields__:
        pytest.skip("this peft has no lora_bias")
    cfg_kw = dict(r=4, lora_alpha=6, target_modules=["query", "value", "intermediate.dense"], **extra)
    folder, peft_merged, cfg = _peft_minilm(minilm_path, tmp_path, **cfg_kw)
    base = load_file(minilm_path)
    ours = LoraMerger.from_files([str(folder / "adapter_model.safetensors")])
    rep = ours.bind(_infos(base))
    merged = {k: ours.apply(k, v) for k, v in base.items()}
    assert rep.matched_modules == 18 and rep.unmatched == []
    n_changed = 18 * (2 if extra.get("lora_bias") else 1)
    _check_against_peft(base, merged, peft_merged, n_changed)


# ------------------------------------------------------------------------------------------------
# key formats of the DiT families, fused targets, float64 references
# ------------------------------------------------------------------------------------------------
def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _lora_pair(out, inp, r, seed):
    return _rand(out, r, seed=seed), _rand(r, inp, seed=seed + 1000)


def _flux_base(h=8, mlp=4, single=True, seed=0):
    sd = {}
    i = 0

    def add(k, *shape):
        nonlocal i
        i += 1
        sd[k] = _rand(*shape, seed=seed + i)
    for s in ("img", "txt"):
        add(f"double_blocks.0.{s}_attn.qkv.weight", 3 * h, h)
        add(f"double_blocks.0.{s}_attn.qkv.bias", 3 * h)
        add(f"double_blocks.0.{s}_attn.proj.weight", h, h)
        add(f"double_blocks.0.{s}_mlp.0.weight", mlp * h, h)
        add(f"double_blocks.0.{s}_mlp.2.weight", h, mlp * h)
        add(f"double_blocks.0.{s}_mod.lin.weight", 6 * h, h)
        add(f"double_blocks.0.{s}_attn.norm.query_norm.scale", h // 2)
    if single:
        add("single_blocks.0.linear1.weight", 3 * h + mlp * h, h)
        add("single_blocks.0.linear1.bias", 3 * h + mlp * h)
        add("single_blocks.0.linear2.weight", h, h + mlp * h)
        add("single_blocks.0.modulation.lin.weight", 3 * h, h)
    add("img_in.weight", h, 16)
    add("final_layer.linear.weight", 16, h)
    add("final_layer.adaLN_modulation.1.weight", 2 * h, h)
    return sd


def test_diffusers_flux_lora_lands_on_fused_rows_float64(tmp_path):
    h, r = 8, 3
    base = _flux_base(h)
    lora, ref = {}, {k: v.double().clone() for k, v in base.items()}
    strength, alpha = 0.7, 5.0
    parts = {  # diffusers name -> (base key, first row, rows)
        "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn.qkv.weight", 0, h),
        "transformer_blocks.0.attn.to_k": ("double_blocks.0.img_attn.qkv.weight", h, h),
        "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn.qkv.weight", 2 * h, h),
        "transformer_blocks.0.attn.add_k_proj": ("double_blocks.0.txt_attn.qkv.weight", h, h),
        "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1.weight", 2 * h, h),
        "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1.weight", 3 * h, 4 * h),
        "single_transformer_blocks.0.proj_out": ("single_blocks.0.linear2.weight", 0, h),
        "transformer_blocks.0.ff.net.0.proj": ("double_blocks.0.img_mlp.0.weight", 0, 4 * h),
        "x_embedder": ("img_in.weight", 0, h),
    }
    for n, (name, (key, row0, rows)) in enumerate(parts.items()):
        inp = base[key].shape[1]
        b, a = _lora_pair(rows, inp, r, seed=10 * n)
        lora[f"transformer.{name}.lora_A.weight"] = a
        lora[f"transformer.{name}.lora_B.weight"] = b
        lora[f"transformer.{name}.alpha"] = torch.tensor(alpha)
        ref[key][row0:row0 + rows] += strength * (alpha / r) * (b.double() @ a.double())
    # norm_out.linear is (scale, shift) in diffusers, (shift, scale) in ComfyUI's final_layer
    b, a = _lora_pair(2 * h, h, r, seed=999)
    lora["transformer.norm_out.linear.lora_A.weight"] = a
    lora["transformer.norm_out.linear.lora_B.weight"] = b
    d = b.double() @ a.double()
    ref["final_layer.adaLN_modulation.1.weight"] += strength * torch.cat([d[h:], d[:h]])  # no alpha: scale 1
    # a bias delta on a part of the fused weight goes to the same rows of the fused bias
    db = _rand(h, seed=77)
    lora["transformer.transformer_blocks.0.attn.to_k.diff_b"] = db
    ref["double_blocks.0.img_attn.qkv.bias"][h:2 * h] += strength * db.double()

    merged, rep, m = _merge(base, [lora], strength)
    assert rep.matched_modules == len(parts) + 1 and rep.unmatched == []
    for k in base:
        assert float((merged[k].double() - ref[k]).abs().max()) < 1e-5, k
    assert set(rep.changed_keys) == {k for k in base if not torch.equal(ref[k], base[k].double())}


def test_kohya_bfl_lora_on_diffusers_layout_splits_rows_float64():
    """The reverse direction: an original-layout (fused qkv / linear1) LoRA on a model stored with
    diffusers names, where q, k, v (and the single-block MLP) are separate weights."""
    h, r = 8, 2
    base = {}
    for n, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        base[f"transformer_blocks.0.{name}.weight"] = _rand(h, h, seed=n)
        base[f"transformer_blocks.0.{name}.bias"] = _rand(h, seed=50 + n)
        base[f"single_transformer_blocks.0.{name}.weight"] = _rand(h, h, seed=10 + n)
    base["single_transformer_blocks.0.proj_mlp.weight"] = _rand(4 * h, h, seed=20)
    base["single_transformer_blocks.0.proj_out.weight"] = _rand(h, 5 * h, seed=21)
    base["norm_out.linear.weight"] = _rand(2 * h, h, seed=22)
    idx = BaseIndex({k: v.shape for k, v in base.items()})
    assert idx.families.get("flux") == "alt"
    b1, a1 = _lora_pair(3 * h, h, r, seed=1)
    b2, a2 = _lora_pair(7 * h, h, r, seed=2)
    b3, a3 = _lora_pair(2 * h, h, r, seed=3)
    diff_b = _rand(3 * h, seed=4)
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a1,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b1,
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0),
            "lora_unet_double_blocks_0_img_attn_qkv.diff_b": diff_b,
            "lora_unet_single_blocks_0_linear1.lora_down.weight": a2,
            "lora_unet_single_blocks_0_linear1.lora_up.weight": b2,
            "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": a3,
            "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": b3}
    merged, rep, _ = _merge(base, [lora], 1.0)
    assert rep.matched_modules == 3 and rep.unmatched == []
    d1 = (1.0 / r) * (b1.double() @ a1.double())
    d2 = b2.double() @ a2.double()
    d3 = b3.double() @ a3.double()
    for j, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        k = f"transformer_blocks.0.{name}.weight"
        assert float((merged[k].double() - (base[k].double() + d1[j * h:(j + 1) * h])).abs().max()) < 1e-6
        kb = f"transformer_blocks.0.{name}.bias"
        assert float((merged[kb].double() - (base[kb].double() + diff_b[j * h:(j + 1) * h].double())).abs().max()) < 1e-6
        k = f"single_transformer_blocks.0.{name}.weight"
        assert float((merged[k].double() - (base[k].double() + d2[j * h:(j + 1) * h])).abs().max()) < 1e-6
    k = "single_transformer_blocks.0.proj_mlp.weight"
    assert float((merged[k].double() - (base[k].double() + d2[3 * h:])).abs().max()) < 1e-6
    k = "norm_out.linear.weight"
    assert float((merged[k].double() - (base[k].double() + torch.cat([d3[h:], d3[:h]]))).abs().max()) < 1e-6
    assert torch.equal(merged["single_transformer_blocks.0.proj_out.weight"],
                       base["single_transformer_blocks.0.proj_out.weight"])


@pytest.mark.parametrize("prefix,style", [
    ("lora_unet_", "kohya"), ("diffusion_model.", "comfy"), ("", "plain"), ("model.diffusion_model.", "ckpt"),
    ("lycoris_", "simpletuner"), ("transformer.", "diffusers-prefixed original names")])
def test_original_names_in_every_prefix_style(prefix, style):
    base = {"model.diffusion_model." + k: v for k, v in _flux_base(8).items()}
    b, a = _lora_pair(24, 8, 4, seed=5)
    name = "double_blocks.0.img_attn.qkv"
    name = flat(name) if prefix in ("lora_unet_", "lycoris_") else name
    lora = {f"{prefix}{name}.lora_down.weight": a, f"{prefix}{name}.lora_up.weight": b,
            f"{prefix}{name}.alpha": torch.tensor(2.0)}
    merged, rep, _ = _merge(base, [lora], 1.5)
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    assert rep.changed_keys == [key], style
    want = base[key].double() + 1.5 * (2.0 / 4) * (b.double() @ a.double())
    assert float((merged[key].double() - want).abs().max()) < 1e-6


def test_sd3_zimage_wan_hunyuan_layouts_float64():
    r = 2
    cases = []
    # SD3 MMDiT: joint_blocks fused qkv; last context block's adaLN (2h rows) is swapped
    h = 8
    sd3 = {"joint_blocks.0.x_block.attn.qkv.weight": _rand(3 * h, h, seed=1),
           "joint_blocks.0.context_block.adaLN_modulation.1.weight": _rand(2 * h, h, seed=2),
           "joint_blocks.0.x_block.adaLN_modulation.1.weight": _rand(6 * h, h, seed=3),
           "x_embedder.proj.weight": _rand(h, 4, 2, 2, seed=4)}
    cases.append((sd3, {"transformer.transformer_blocks.0.attn.to_v": ("joint_blocks.0.x_block.attn.qkv.weight", 2 * h, h, False),
                        "transformer.transformer_blocks.0.norm1_context.linear": ("joint_blocks.0.context_block.adaLN_modulation.1.weight", 0, 2 * h, True),
                        "transformer.transformer_blocks.0.norm1.linear": ("joint_blocks.0.x_block.adaLN_modulation.1.weight", 0, 6 * h, False)}))
    # Z-Image / Lumina2 with grouped-query attention: q rows = dim, k = v = the rest split in two
    dim, kv = 12, 4
    zi = {"layers.0.attention.qkv.weight": _rand(dim + 2 * kv, dim, seed=5),
          "noise_refiner.0.attention.qkv.weight": _rand(3 * dim, dim, seed=6),
          "layers.0.attention.out.weight": _rand(dim, dim, seed=7),
          "final_layer.linear.weight": _rand(4, dim, seed=8)}
    cases.append((zi, {"diffusion_model.layers.0.attention.to_k": ("layers.0.attention.qkv.weight", dim, kv, False),
                       "diffusion_model.layers.0.attention.to_v": ("layers.0.attention.qkv.weight", dim + kv, kv, False),
                       "transformer.noise_refiner.0.attention.to_q": ("noise_refiner.0.attention.qkv.weight", 0, dim, False),
                       "layers.0.attention.to_out.0": ("layers.0.attention.out.weight", 0, dim, False),
                       "all_final_layer.2-1.linear": ("final_layer.linear.weight", 0, 4, False)}))
    # Wan: diffusers names onto the original checkpoint names
    wan = {"blocks.0.self_attn.q.weight": _rand(h, h, seed=9), "blocks.0.cross_attn.k_img.weight": _rand(h, 6, seed=10),
           "blocks.0.ffn.0.weight": _rand(2 * h, h, seed=11), "head.head.weight": _rand(4, h, seed=12)}
    cases.append((wan, {"transformer.blocks.0.attn1.to_q": ("blocks.0.self_attn.q.weight", 0, h, False),
                        "transformer.blocks.0.attn2.add_k_proj": ("blocks.0.cross_attn.k_img.weight", 0, h, False),
                        "blocks.0.ffn.net.0.proj": ("blocks.0.ffn.0.weight", 0, 2 * h, False),
                        "transformer.proj_out": ("head.head.weight", 0, 4, False)}))
    # HunyuanVideo: diffusion-pipe (original Tencent) names onto ComfyUI's
    hy = {"double_blocks.0.img_attn.qkv.weight": _rand(3 * h, h, seed=13),
          "double_blocks.0.img_mod.lin.weight": _rand(6 * h, h, seed=14),
          "double_blocks.0.img_mlp.0.weight": _rand(4 * h, h, seed=15),
          "single_blocks.0.modulation.lin.weight": _rand(3 * h, h, seed=16)}
    cases.append((hy, {"transformer.double_blocks.0.img_attn_qkv": ("double_blocks.0.img_attn.qkv.weight", 0, 3 * h, False),
                       "transformer.double_blocks.0.img_mod.linear": ("double_blocks.0.img_mod.lin.weight", 0, 6 * h, False),
                       "diffusion_model.double_blocks.0.img_mlp.fc1": ("double_blocks.0.img_mlp.0.weight", 0, 4 * h, False),
                       "transformer.single_blocks.0.modulation.linear": ("single_blocks.0.modulation.lin.weight", 0, 3 * h, False)}))
    for ci, (base, targets) in enumerate(cases):
        lora, ref = {}, {k: v.double().clone() for k, v in base.items()}
        for n, (name, (key, row0, rows, swap)) in enumerate(targets.items()):
            inp = math.prod(base[key].shape[1:])
            b, a = _lora_pair(rows, inp, r, seed=100 * ci + n)
            lora[f"{name}.lora_A.weight"] = a
            lora[f"{name}.lora_B.weight"] = b
            d = (b.double() @ a.double())
            if swap:
                d = torch.cat([d[rows // 2:], d[:rows // 2]])
            ref[key][row0:row0 + rows] += d.reshape((rows,) + tuple(base[key].shape[1:]))
        merged, rep, _ = _merge(base, [lora])
        assert rep.matched_modules == len(targets) and rep.unmatched == [], (ci, rep.unmatched)
        for k in base:
            assert float((merged[k].double() - ref[k]).abs().max()) < 1e-5, (ci, k)


# ------------------------------------------------------------------------------------------------
# LoHa / LoKr / LoCon / diff against float64 formulas
# ------------------------------------------------------------------------------------------------
def test_loha_plain_and_cp_float64():
    out, inp, r, k = 6, 5, 3, 3
    base = {"lin.weight": _rand(out, inp, seed=1), "conv.weight": _rand(out, inp, k, k, seed=2)}
    w1a, w1b, w2a, w2b = _rand(out, r, seed=3), _rand(r, inp, seed=4), _rand(out, r, seed=5), _rand(r, inp, seed=6)
    # CP/Tucker form: hada_w*_a is [r, out], hada_w*_b is [r, in], hada_t* is [r, r, k, k]
    c1a, c1b, c2a, c2b = _rand(r, out, seed=7), _rand(r, inp, seed=8), _rand(r, out, seed=9), _rand(r, inp, seed=10)
    t1, t2 = _rand(r, r, k, k, seed=11), _rand(r, r, k, k, seed=12)
    lora = {"lora_unet_lin.hada_w1_a": w1a, "lora_unet_lin.hada_w1_b": w1b, "lora_unet_lin.hada_w2_a": w2a,
            "lora_unet_lin.hada_w2_b": w2b, "lora_unet_lin.alpha": torch.tensor(2.0),
            "lora_unet_conv.hada_w1_a": c1a, "lora_unet_conv.hada_w1_b": c1b, "lora_unet_conv.hada_w2_a": c2a,
            "lora_unet_conv.hada_w2_b": c2b, "lora_unet_conv.hada_t1": t1, "lora_unet_conv.hada_t2": t2,
            "lora_unet_conv.alpha": torch.tensor(1.5)}
    merged, rep, _ = _merge(base, [lora], 0.8)
    assert rep.matched_modules == 2
    ref_lin = base["lin.weight"].double() + 0.8 * (2.0 / r) * ((w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()))

    def cp(ta, a, b):
        m = torch.zeros(out, inp, k, k, dtype=torch.float64)
        for y in range(k):
            for x in range(k):
                m[:, :, y, x] = a.double().t() @ ta[:, :, y, x].double() @ b.double()
        return m
    ref_conv = base["conv.weight"].double() + 0.8 * (1.5 / r) * (cp(t1, c1a, c1b) * cp(t2, c2a, c2b))
    assert float((merged["lin.weight"].double() - ref_lin).abs().max()) < 1e-5
    assert float((merged["conv.weight"].double() - ref_conv).abs().max()) < 1e-4


def _kron_ref(w1, w2):
    o1, i1 = w1.shape[:2]
    o2, i2 = w2.shape[:2]
    out = torch.zeros((o1 * o2, i1 * i2) + tuple(w2.shape[2:]), dtype=torch.float64)
    for a in range(o1):
        for b in range(i1):
            out[a * o2:(a + 1) * o2, b * i2:(b + 1) * i2] = w1[a, b].double() * w2.double()
    return out


def test_lokr_variants_float64():
    base = {"full.weight": _rand(6, 8, seed=1), "w2fact.weight": _rand(6, 8, seed=2), "w1fact.weight": _rand(6, 8, seed=3),
            "conv.weight": _rand(6, 4, 3, 3, seed=4), "convflat.weight": _rand(6, 4, 3, 3, seed=5)}
    w1, w2 = _rand(2, 2, seed=10), _rand(3, 4, seed=11)
    w2a, w2b = _rand(3, 2, seed=12), _rand(2, 4, seed=13)
    w1a, w1b = _rand(2, 1, seed=14), _rand(1, 2, seed=15)
    t2, c2a, c2b = _rand(2, 2, 3, 3, seed=16), _rand(2, 3, seed=17), _rand(2, 2, seed=18)
    f2a, f2b = _rand(3, 2, seed=19), _rand(2, 2 * 9, seed=20)
    lora = {
        # both factors whole: scale 1 whatever alpha says (LyCORIS full-matrix mode)
        "full.lokr_w1": w1, "full.lokr_w2": w2, "full.alpha": torch.tensor(8.0),
        # w2 factored: scale alpha / rank(w2)
        "w2fact.lokr_w1": w1, "w2fact.lokr_w2_a": w2a, "w2fact.lokr_w2_b": w2b, "w2fact.alpha": torch.tensor(3.0),
        # w1 factored, w2 whole: scale alpha / rank(w1)
        "w1fact.lokr_w1_a": w1a, "w1fact.lokr_w1_b": w1b, "w1fact.lokr_w2": w2, "w1fact.alpha": torch.tensor(0.5),
        # conv with Tucker w2 (4-D): w1 is broadcast over the kernel
        "conv.lokr_w1": w1, "conv.lokr_w2_a": c2a, "conv.lokr_w2_b": c2b, "conv.lokr_t2": t2, "conv.alpha": torch.tensor(4.0),
        # conv with a flat w2 = a @ b reshaped to the kernel
        "convflat.lokr_w1": w1, "convflat.lokr_w2_a": f2a, "convflat.lokr_w2_b": f2b,
    }
    merged, rep, _ = _merge(base, [lora], 1.0)
    assert rep.matched_modules == 5
    refs = {
        "full.weight": _kron_ref(w1, w2),
        "w2fact.weight": (3.0 / 2) * _kron_ref(w1, w2a.double() @ w2b.double()),
        "w1fact.weight": (0.5 / 1) * _kron_ref(w1a.double() @ w1b.double(), w2),
    }
    tw2 = torch.zeros(3, 2, 3, 3, dtype=torch.float64)
    for y in range(3):
        for x in range(3):
            tw2[:, :, y, x] = c2a.double().t() @ t2[:, :, y, x].double() @ c2b.double()
    conv_ref = torch.zeros(6, 4, 3, 3, dtype=torch.float64)
    for y in range(3):
        for x in range(3):
            conv_ref[:, :, y, x] = _kron_ref(w1, tw2[:, :, y, x])
    refs["conv.weight"] = (4.0 / 2) * conv_ref
    refs["convflat.weight"] = _kron_ref(w1, f2a.double() @ f2b.double()).reshape(6, 4, 3, 3)  # no alpha: scale 1
    for k, d in refs.items():
        assert float((merged[k].double() - (base[k].double() + d)).abs().max()) < 1e-5, k


def test_locon_conv_with_and_without_mid_and_diff_set_float64():
    base = {"c.weight": _rand(6, 4, 3, 3, seed=1), "c.bias": _rand(6, seed=2), "m.weight": _rand(6, 4, 3, 3, seed=3),
            "n.weight": _rand(6, seed=4), "n.bias": _rand(6, seed=5), "s.weight": _rand(3, 2, seed=6),
            "p.weight": _rand(5, 5, seed=7)}
    up, down = _rand(6, 2, 1, 1, seed=10), _rand(2, 4, 3, 3, seed=11)
    mup, mid, mdown = _rand(6, 2, 1, 1, seed=12), _rand(2, 2, 3, 3, seed=13), _rand(2, 4, 1, 1, seed=14)
    diff_w, diff_b, setw = _rand(6, seed=15), _rand(6, seed=16), _rand(3, 2, seed=17)
    lora = {"lora_unet_c.lora_up.weight": up, "lora_unet_c.lora_down.weight": down, "lora_unet_c.alpha": torch.tensor(1.0),
            "lora_unet_m.lora_up.weight": mup, "lora_unet_m.lora_mid.weight": mid,
            "lora_unet_m.lora_down.weight": mdown, "lora_unet_m.alpha": torch.tensor(3.0),
            "lora_unet_n.w_norm": diff_w, "lora_unet_n.b_norm": diff_b,
            "lora_unet_s.set_weight": setw}
    merged, rep, _ = _merge(base, [lora], 0.5)
    assert rep.matched_modules == 4 and rep.unmatched == []
    ref_c = torch.einsum("or,rihw->oihw", up.double()[:, :, 0, 0], down.double())
    ref_m = torch.einsum("oa,abhw,bi->oihw", mup.double()[:, :, 0, 0], mid.double(), mdown.double()[:, :, 0, 0])
    checks = {"c.weight": base["c.weight"].double() + 0.5 * 0.5 * ref_c,
              "m.weight": base["m.weight"].double() + 0.5 * 1.5 * ref_m,
              "n.weight": base["n.weight"].double() + 0.5 * diff_w.double(),
              "n.bias": base["n.bias"].double() + 0.5 * diff_b.double(),
              "s.weight": setw.double(), "c.bias": base["c.bias"].double(), "p.weight": base["p.weight"].double()}
    for k, want in checks.items():
        assert float((merged[k].double() - want).abs().max()) < 1e-5, k
    assert merged["p.weight"] is base["p.weight"]  # untouched tensors come back as they are


# ------------------------------------------------------------------------------------------------
# several LoRAs, strengths, dampening
# ------------------------------------------------------------------------------------------------
def test_multiple_loras_strengths_and_dampening_once():
    h, r = 8, 2
    base = _flux_base(h, single=False)
    b1, a1 = _lora_pair(3 * h, h, r, seed=1)   # file 1: whole img qkv
    b2, a2 = _lora_pair(h, h, r, seed=2)       # file 2: only the k rows of img qkv
    b3, a3 = _lora_pair(h, h, r, seed=3)       # file 2: img proj (only file 2 touches it)
    l1 = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a1,
          "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b1}
    l2 = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a2,
          "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": b2,
          "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": a3,
          "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": b3}
    d1 = 0.5 * (b1.double() @ a1.double())
    d2 = torch.zeros(3 * h, h, dtype=torch.float64)
    d2[h:2 * h] = 2.0 * (b2.double() @ a2.double())
    d3 = 2.0 * (b3.double() @ a3.double())
    qkv, proj = "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.proj.weight"
    for dampen in (False, True):
        merged, rep, _ = _merge(base, [l1, l2], [0.5, 2.0], dampen=dampen)
        f = torch.ones(3 * h, 1, dtype=torch.float64)
        if dampen:
            f[h:2 * h] = 1 / math.sqrt(2)  # only the k rows are changed by two files
        assert float((merged[qkv].double() - (base[qkv].double() + (d1 + d2) * f)).abs().max()) < 1e-5, dampen
        assert float((merged[proj].double() - (base[proj].double() + d3)).abs().max()) < 1e-5, dampen
        assert rep.dampen is dampen


def test_strength_list_length_must_match():
    with pytest.raises(LoRAError, match="strengths"):
        LoraMerger.from_state_dicts([{}, {}], [1.0, 2.0, 3.0])


# ------------------------------------------------------------------------------------------------
# components, reports, errors
# ------------------------------------------------------------------------------------------------
def test_text_encoder_parts_are_reported_not_merged_into_the_dit():
    base = _flux_base(8, single=False)
    b, a = _lora_pair(24, 8, 2, seed=1)
    tb, ta = _lora_pair(8, 8, 2, seed=2)
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b,
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": ta,
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": tb}
    for strict in (False, True):
        _, rep, _ = _merge(base, [lora], strict=strict)  # other parts of the pipeline are no error, even strict
        assert rep.matched_modules == 1 and rep.unmatched == []
        assert rep.files[0].other_component == ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"]
        assert any("another part of the model" in line for line in rep.lines())


def test_sdxl_style_te2_on_a_clip_l_file_is_another_encoder_by_shape():
    base = {"text_model.encoder.layers.0.self_attn.q_proj.weight": _rand(8, 8, seed=1)}
    b1, a1 = _lora_pair(8, 8, 2, seed=2)
    b2, a2 = _lora_pair(12, 12, 2, seed=3)  # CLIP-G is wider
    lora = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": a1,
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": b1,
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": a2,
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": b2}
    merged, rep, _ = _merge(base, [lora])
    assert rep.matched_modules == 1
    assert rep.files[0].other_component == ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    k = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert float((merged[k].double() - base[k].double() - b1.double() @ a1.double()).abs().max()) < 1e-5


def test_unmatched_keys_are_listed_and_strict_makes_them_errors():
    base = _flux_base(8, single=False)
    b, a = _lora_pair(24, 8, 2, seed=1)
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b,
            "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": a,
            "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": b,
            "some_trainer_step_counter": torch.tensor(3.0)}
    _, rep, _ = _merge(base, [lora])
    assert rep.matched_modules == 1
    assert len(rep.unmatched) == 2
    assert any("double_blocks_7" in u and "no layer" in u for u in rep.unmatched)
    assert any("some_trainer_step_counter" in u for u in rep.unmatched)
    assert any("matched nothing and were NOT merged" in line for line in rep.lines())
    with pytest.raises(LoRAError, match=r"(?s)double_blocks_7.*strict"):
        _merge(base, [lora], strict=True)


@pytest.mark.parametrize("case,match", [
    ("shape", r"shape mismatch: the LoRA delta is \[16, 8\] but double_blocks.0.img_attn.qkv.weight is \[24, 8\]"),
    ("fused_shape", r"shape mismatch.*rows 8:16 is \[8, 8\]"),
    ("rank", r"rank mismatch: up \[24, 3\] has inner size 3 but down \[2, 8\] has rank 2"),
    ("half", r"lora_down without its lora_up"),
    ("nothing", r"none of its 1 modules matches a layer of this model"),
    ("oft", r"OFT/BOFT adapters are not supported"),
    ("nan", r"NaN or Inf"),
    ("bias", r"has a bias delta but the base layer double_blocks.0.img_attn.proj.weight has no bias"),
    ("loha_rank", r"rank mismatch: hada_w1_a \[24, 2\] @ hada_w1_b \[3, 8\]"),
])
def test_bad_loras_raise_clear_errors(case, match):
    base = _flux_base(8, single=False)
    k = "lora_unet_double_blocks_0_img_attn_qkv"
    b, a = _lora_pair(24, 8, 2, seed=1)
    lora = {
        "shape": {f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": b[:16]},
        "fused_shape": {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a,
                        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": b},
        "rank": {f"{k}.lora_down.weight": a, f"{k}.lora_up.weight": _rand(24, 3)},
        "half": {f"{k}.lora_down.weight": a},
        "nothing": {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": a,
                    "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": b},
        "oft": {f"{k}.oft_blocks": _rand(4, 6, 6)},
        "nan": {f"{k}.lora_down.weight": a * float("nan"), f"{k}.lora_up.weight": b},
        "bias": {"lora_unet_double_blocks_0_img_attn_proj.diff_b": _rand(8)},
        "loha_rank": {f"{k}.hada_w1_a": _rand(24, 2), f"{k}.hada_w1_b": _rand(3, 8),
                      f"{k}.hada_w2_a": _rand(24, 2), f"{k}.hada_w2_b": _rand(2, 8)},
    }[case]
    with pytest.raises(LoRAError, match=match):
        _merge(base, [lora])


def test_problems_are_collected_into_one_error():
    base = _flux_base(8, single=False)
    b, a = _lora_pair(24, 8, 2, seed=1)
    lora = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b[:16],
            "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": a[:1],
            "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": b}
    with pytest.raises(LoRAError) as ei:
        _merge(base, [lora])
    msg = str(ei.value)
    assert msg.startswith("2 LoRA problems; nothing was merged or written")
    assert "img_attn_qkv: shape mismatch" in msg and "txt_attn_qkv: rank mismatch" in msg


def test_quantized_base_is_refused():
    b, a = _lora_pair(8, 8, 2, seed=1)
    with pytest.raises(LoRAError, match="not a float weight"):
        _merge({"x.weight": torch.zeros(8, 8, dtype=torch.int8)},
               [{"x.lora_down.weight": a, "x.lora_up.weight": b}])


def test_report_lists_layers_kept_high_precision():
    base = _flux_base(8, single=False)
    b, a = _lora_pair(16, 8, 2, seed=1)
    lora = {"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": a,
            "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": b}
    m = LoraMerger.from_state_dicts([lora])
    rep = m.bind(_infos(base), kept={"final_layer.adaLN_modulation.1.weight", "img_in.weight"})
    assert rep.kept_high_precision == ["final_layer.adaLN_modulation.1.weight"]
    assert any("stay high precision" in line for line in rep.lines())
    json.dumps(rep.to_dict())


def test_merge_state_dict_keeps_input_and_dtypes(tmp_path):
    base = {k: v.to(torch.bfloat16) for k, v in _flux_base(8, single=False).items()}
    before = {k: v.clone() for k, v in base.items()}
    b, a = _lora_pair(24, 8, 2, seed=1)
    p = save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b}, str(tmp_path / "l.safetensors"))
    out, rep = merge_state_dict(base, [p], [1.0])
    key = "double_blocks.0.img_attn.qkv.weight"
    assert all(torch.equal(base[k], before[k]) for k in base)
    assert out[key].dtype == torch.bfloat16 and not torch.equal(out[key], base[key])
    want = (base[key].float() + b @ a).to(torch.bfloat16)
    assert torch.equal(out[key], want)
    out32, _ = merge_state_dict(base, [p], 1.0, out_dtype=torch.float32)
    assert out32[key].dtype == torch.float32 and out32["img_in.weight"] is base["img_in.weight"]


def test_pickle_lora_is_refused(tmp_path):
    p = tmp_path / "lora.pt"
    p.write_bytes(b"not read")
    with pytest.raises(Exception, match="pickle"):
        LoraMerger.from_files([str(p)])


def test_pipeline_merges_while_streaming_and_writes_nothing_on_error(minilm_path, tmp_path):
    from convert_to_quant.quant_core.formats import make_spec
    from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
    from convert_to_quant.quant_core.plan import PlanOptions

    base = load_file(minilm_path)
    key = "encoder.layer.0.attention.self.query.weight"
    b, a = _lora_pair(384, 384, 4, seed=3)
    good = save_file({"lora_te_encoder_layer_0_attention_self_query.lora_down.weight": a * 0.05,
                      "lora_te_encoder_layer_0_attention_self_query.lora_up.weight": b * 0.05},
                     str(tmp_path / "good.safetensors"))
    bad = save_file({"lora_te_encoder_layer_0_attention_self_query.lora_down.weight": a[:, :100],
                     "lora_te_encoder_layer_0_attention_self_query.lora_up.weight": b},
                    str(tmp_path / "bad.safetensors"))
    out = str(tmp_path / "out.safetensors")
    opts = ConvertOptions(plan=PlanOptions(spec=make_spec(format="fp16")), loras=[good], lora_strengths=[0.5])
    res = convert_file(minilm_path, out, opts)
    assert res.lora_report.matched_modules == 1
    got = load_file(out)[key]
    want = (base[key].double() + 0.5 * (b * 0.05).double() @ (a * 0.05).double()).to(torch.float16)
    assert float((got.double() - want.double()).abs().max()) <= 2 ** -10
    out2 = str(tmp_path / "out2.safetensors")
    with pytest.raises(LoRAError, match="shape mismatch"):
        convert_file(minilm_path, out2, ConvertOptions(loras=[bad]))
    assert not os.path.exists(out2) and not os.path.exists(out2 + ".partial")
    assert read_header(minilm_path)[0][key].shape == (384, 384)  # input untouched


@pytest.mark.parametrize("base_prefix", ["", "text_encoders.t5xxl.transformer.", "t5xxl.transformer."])
def test_text_encoder_key_styles_t5_and_clip(base_prefix):
    """T5 (Flux/SD3 trainers: kohya lora_te2_/lora_te3_, diffusers text_encoder_2., ComfyUI
    text_encoders.t5xxl.) and CLIP-L (lora_te1_, text_encoder.) onto their weights."""
    t5q = base_prefix + "encoder.block.0.layer.0.SelfAttention.q.weight"
    t5o = base_prefix + "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    clip_prefix = "clip_l.transformer." if base_prefix else ""
    clq = clip_prefix + "text_model.encoder.layers.0.self_attn.q_proj.weight"
    base = {t5q: _rand(8, 8, seed=1), t5o: _rand(8, 16, seed=2), clq: _rand(6, 6, seed=3)}
    lora, want = {}, {k: v.double().clone() for k, v in base.items()}
    specs = [("lora_te2_encoder_block_0_layer_0_SelfAttention_q", t5q, ".lora_down.weight", ".lora_up.weight"),
             ("text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wo", t5o, ".lora_A.weight", ".lora_B.weight"),
             ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", clq, ".lora_down.weight", ".lora_up.weight")]
    for n, (name, key, dn, up) in enumerate(specs):
        b, a = _lora_pair(base[key].shape[0], base[key].shape[1], 2, seed=10 + n)
        lora[name + dn], lora[name + up] = a, b
        want[key] += b.double() @ a.double()
    merged, rep, _ = _merge(base, [lora])
    assert rep.matched_modules == 3 and rep.unmatched == []
    for k in base:
        assert float((merged[k].double() - want[k]).abs().max()) < 1e-5, k
    if base_prefix.startswith("text_encoders."):
        lora2 = {f"text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q{s}": t
                 for s, t in ((".lora_down.weight", _rand(2, 8)), (".lora_up.weight", _rand(8, 2)))}
        _, rep2, _ = _merge(base, [lora2])
        assert rep2.changed_keys == [t5q]


def test_cli_merge_flags_strict_and_scale(minilm_path, tmp_path):
    from convert_to_quant.quant_core.cli import main

    b, a = _lora_pair(384, 384, 4, seed=3)
    lora = save_file({"lora_te_encoder_layer_0_attention_self_query.lora_down.weight": a * 0.05,
                      "lora_te_encoder_layer_0_attention_self_query.lora_up.weight": b * 0.05,
                      "lora_te_encoder_layer_9_attention_self_query.lora_down.weight": a * 0.05,
                      "lora_te_encoder_layer_9_attention_self_query.lora_up.weight": b * 0.05},
                     str(tmp_path / "l.safetensors"))
    out = str(tmp_path / "o.safetensors")
    assert main(["-i", minilm_path, "-o", out, "--fp16", "--merge-lora", lora, "--merge-lora-scale", "0.5",
                 "--merge-lora-strict", "--verbose", "MINIMAL"]) == 2
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    assert main(["-i", minilm_path, "-o", out, "--fp16", "--merge-loras", lora, lora, "--merge-lora-scale", "0.5",
                 "0.25", "--merge-lora-dampen", "--verbose", "MINIMAL"]) == 0
    key = "encoder.layer.0.attention.self.query.weight"
    base = load_file(minilm_path)[key].double()
    # two files change the same rows: (0.5 + 0.25) * delta / sqrt(2)
    want = (base + 0.75 / math.sqrt(2) * ((b * 0.05).double() @ (a * 0.05).double())).to(torch.float16)
    assert float((load_file(out)[key].double() - want.double()).abs().max()) <= 2 ** -10


@pytest.mark.parametrize("base_keys,lora_name,want_key,want_rows", [
    # Flux.2: SwiGLU MLP names, fused single-block projection in diffusers too, shared modulations
    ({"double_blocks.0.img_attn.qkv.weight": (96, 32), "double_blocks.0.img_mlp.0.weight": (192, 32)},
     "transformer.transformer_blocks.0.ff.linear_in", "double_blocks.0.img_mlp.0.weight", None),
    ({"single_blocks.0.linear1.weight": (96 + 192, 32)},
     "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_blocks.0.linear1.weight", None),
    ({"single_blocks.0.linear1.weight": (96 + 192, 32), "double_stream_modulation_img.lin.weight": (192, 32)},
     "transformer.double_stream_modulation_img.linear", "double_stream_modulation_img.lin.weight", None),
    ({"single_blocks.0.linear1.weight": (288, 32), "time_in.in_layer.weight": (32, 256)},
     "transformer.time_guidance_embed.timestep_embedder.linear_1", "time_in.in_layer.weight", None),
    # Chroma's approximator
    ({"double_blocks.0.img_attn.qkv.weight": (96, 32), "distilled_guidance_layer.layers.3.in_layer.weight": (16, 16)},
     "transformer.distilled_guidance_layer.layers.3.linear_1", "distilled_guidance_layer.layers.3.in_layer.weight", None),
    # Qwen-Image keeps diffusers names in ComfyUI: plain, transformer. and lycoris_ forms
    ({"transformer_blocks.0.img_mlp.net.0.proj.weight": (64, 16), "img_in.weight": (16, 8)},
     "transformer.transformer_blocks.0.img_mlp.net.0.proj", "transformer_blocks.0.img_mlp.net.0.proj.weight", None),
    ({"transformer_blocks.0.attn.to_q.weight": (16, 16), "img_in.weight": (16, 8)},
     "lycoris_transformer_blocks_0_attn_to_q", "transformer_blocks.0.attn.to_q.weight", None),
    # Z-Image diffusers on a checkpoint with the model.diffusion_model. prefix
    ({"model.diffusion_model.context_refiner.1.attention.qkv.weight": (48, 16)},
     "diffusion_model.context_refiner.1.attention.to_v", "model.diffusion_model.context_refiner.1.attention.qkv.weight", (32, 16)),
    # HunyuanVideo single block via the flux rules (same BFL layout)
    ({"single_blocks.2.linear1.weight": (3 * 16 + 64, 16)},
     "transformer.single_transformer_blocks.2.attn.to_k", "single_blocks.2.linear1.weight", (16, 16)),
])
def test_family_name_mapping(base_keys, lora_name, want_key, want_rows):
    res = BaseIndex(base_keys).resolve(lora_name)
    assert not res.error, res.error
    assert [(t.key, t.rows) for t in res.targets] == [(want_key, want_rows)]


def test_unsupported_and_reshaping_loras_name_the_reason():
    base = {"img_in.weight": _rand(8, 16)}
    with pytest.raises(LoRAError, match="reshape_weight"):
        _merge(base, [{"img_in.lora_A.weight": _rand(2, 32), "img_in.lora_B.weight": _rand(8, 2),
                       "img_in.reshape_weight": torch.tensor([8, 32])}])
    with pytest.raises(LoRAError, match="GLoRA"):
        _merge(base, [{"img_in.a1.weight": _rand(2, 16), "img_in.a2.weight": _rand(16, 2),
                       "img_in.b1.weight": _rand(2, 16), "img_in.b2.weight": _rand(8, 2)}])
    with pytest.raises(LoRAError, match="several PEFT adapters"):
        _merge(base, [{"img_in.lora_A.one.weight": _rand(2, 16), "img_in.lora_B.one.weight": _rand(8, 2),
                       "x.lora_A.two.weight": _rand(2, 16), "x.lora_B.two.weight": _rand(8, 2)}])


def test_xlabs_uso_processor_lora_float64():
    """XLabs / USO Flux LoRAs: "double_blocks.N.processor.qkv_lora1.down.weight" (img qkv), qkv_lora2
    (txt), proj_lora1/2, and USO's single-block "processor.qkv_lora" (q/k/v rows of linear1) and
    "processor.proj_lora" (linear2); no alpha (scale 1), as ComfyUI converts them."""
    h = 8
    base = _flux_base(h)
    specs = {"double_blocks.0.processor.qkv_lora1": ("double_blocks.0.img_attn.qkv.weight", 0, 3 * h),
             "double_blocks.0.processor.qkv_lora2": ("double_blocks.0.txt_attn.qkv.weight", 0, 3 * h),
             "double_blocks.0.processor.proj_lora1": ("double_blocks.0.img_attn.proj.weight", 0, h),
             "single_blocks.0.processor.qkv_lora": ("single_blocks.0.linear1.weight", 0, 3 * h),
             "single_blocks.0.processor.proj_lora": ("single_blocks.0.linear2.weight", 0, h)}
    lora, ref = {}, {k: v.double().clone() for k, v in base.items()}
    for n, (name, (key, row0, rows)) in enumerate(specs.items()):
        b, a = _lora_pair(rows, base[key].shape[1], 2, seed=n)
        lora[f"{name}.down.weight"], lora[f"{name}.up.weight"] = a, b
        ref[key][row0:row0 + rows] += 0.9 * (b.double() @ a.double())
    merged, rep, _ = _merge(base, [lora], 0.9)
    assert rep.matched_modules == len(specs) and rep.unmatched == []
    for k in base:
        assert float((merged[k].double() - ref[k]).abs().max()) < 1e-5, k


def test_scalar_parameters_and_files_without_lora_tensors():
    base = {"x.weight": _rand(4, 4), "logit_scale": torch.tensor(2.0)}
    merged, rep, _ = _merge(base, [{"logit_scale.diff": torch.tensor(0.25)}], 2.0)
    assert float(merged["logit_scale"]) == 2.5 and rep.changed_keys == ["logit_scale"]
    with pytest.raises(LoRAError, match="shape mismatch"):
        _merge(base, [{"logit_scale.diff": torch.ones(2)}])
    with pytest.raises(LoRAError, match="holds no LoRA tensors this merger knows"):
        _merge(base, [{"model.layers.0.weight": _rand(4, 4)}])


@pytest.mark.parametrize("metadata,want_scales", [
    # diffusers pipeline save_lora_weights: one config per component, keys prefixed "transformer."
    ({"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8,
                                           "transformer.alpha_pattern": {"attn.to_k": 2}})}, (2.0, 0.5)),
    # kohya's training metadata (used only when a module has no .alpha tensor)
    ({"ss_network_alpha": "1", "ss_network_dim": "4"}, (0.25, 0.25)),
    # nothing: alpha = rank
    ({}, (1.0, 1.0)),
])
def test_alpha_from_metadata_forms(metadata, want_scales):
    h, r = 8, 4
    base = _flux_base(h, single=False)
    lora = {}
    for part in ("to_q", "to_k"):
        b, a = _lora_pair(h, h, r, seed=len(lora))
        lora[f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight"] = a
        lora[f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight"] = b
    m = LoraMerger.from_state_dicts([lora], metadata=[metadata])
    m.bind(_infos(base))
    mods = m.files[0].modules
    got = tuple(mods[f"transformer.transformer_blocks.0.attn.{p}"].scale for p in ("to_q", "to_k"))
    assert got == want_scales


# ------------------------------------------------------------------------------------------------
# hostile LoRA metadata, strengths and names (issue 14)
# ------------------------------------------------------------------------------------------------
def test_name_candidates_are_bounded_and_real_prefix_stacks_still_resolve():
    from convert_to_quant.quant_core.lora_keys import MAX_PREFIX_STRIPS, lora_name_candidates
    name = "lora_unet_" * 20000 + "x"
    tag, cands = lora_name_candidates(name)
    assert tag == "unet" and len(cands) == MAX_PREFIX_STRIPS + 1
    assert sum(len(c) for c in cands) <= (MAX_PREFIX_STRIPS + 1) * len(name)
    assert cands[1] == name[len("lora_unet_"):]  # each candidate strips one more prefix
    # the stacks trainers write are all within the bound
    assert lora_name_candidates("base_model.model.transformer.transformer_blocks.0.attn.to_q")[1][-1] == \
        "transformer_blocks.0.attn.to_q"
    assert lora_name_candidates("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1") == \
        ("slot:clip_l", ["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
                         "text_model.encoder.layers.0.mlp.fc1"])
    assert lora_name_candidates("lora_unet__blocks_0_self_attn_q")[1] == ["lora_unet__blocks_0_self_attn_q",
                                                                         "blocks_0_self_attn_q"]


def test_split_lora_key_equals_the_anchored_lazy_definition_and_is_linear():
    """``split_lora_key`` searches only the tail of a key; on every rule it gives what the definition
    ``^(?P<module>.+?)<suffix>$`` gives (shortest module, first rule), and a 1.2 MB key costs no more."""
    import re
    from convert_to_quant.quant_core import lora_keys

    def reference(key):
        for pat, role in lora_keys._SUFFIX_RULES:
            m = re.match(r"^(?P<module>.+?)" + pat + r"$", key)
            if m:
                return m.group("module"), role, (m.groupdict().get("adapter") or None)
        return None
    suffixes = [".lora_up.weight", ".lora_down.weight", ".lora_A.weight", ".lora_B.default.weight",
                ".lora_B.my-adapter_2.bias", ".lora_A", "_lora.up.weight", ".lora.down.weight",
                ".lora_linear_layer.up.weight", ".up.weight", ".alpha", ".dora_scale",
                ".lora_magnitude_vector", ".lora_magnitude_vector.default.weight", ".hada_w1_a", ".hada_t2",
                ".lokr_w1", ".lokr_w2_b", ".diff", ".diff_b", ".set_weight", ".w_norm", ".oft_blocks",
                ".a1.weight", ".weight", "", ".lora_up.weight.x"]
    modules = ["m", "a.b.c", "lora_unet_double_blocks_0_img_attn_qkv", "x.lora_A.weight", "x.lora_up", "a" * 5000]
    keys = [m + s for m in modules for s in suffixes] + [".lora_up.weight", "alpha", ".alpha"]
    for k in keys:
        assert lora_keys.split_lora_key(k) == reference(k), k
    long_module = "lora_unet_" * 120_000 + "x"
    assert lora_keys.split_lora_key(long_module + ".lora_down.weight") == (long_module, "down", None)
    assert lora_keys.split_lora_key(long_module) is None


def test_alpha_pattern_is_matched_as_peft_does():
    """PEFT: the first pattern p (config order) with ``re.match(rf"(.*\\.)?({p})$", name)``; a regex,
    anchored at a dotted-name boundary ("o_q" is not a suffix pattern of "attn.to_q", nor "blocks.0..." of
    "transformer_blocks.0...")."""
    h, r = 8, 4
    base = _flux_base(h, single=False)
    lora = {}
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        b, a = _lora_pair(h, h, r, seed=10 * i)
        lora[f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight"] = a
        lora[f"transformer.transformer_blocks.0.attn.{part}.lora_B.weight"] = b
    pats = {"o_q": 100, r"attn\.to_[qk]": 2, "to_q": 12, "blocks.0.attn.to_v": 100, "transformer_blocks.0.attn.to_v": 1}
    meta = {"lora_adapter_metadata": json.dumps({"lora_alpha": 8, "alpha_pattern": pats})}
    m = LoraMerger.from_state_dicts([lora], metadata=[meta])
    m.bind(_infos(base))
    scales = {p: m.files[0].modules[f"transformer.transformer_blocks.0.attn.{p}"].scale
              for p in ("to_q", "to_k", "to_v")}
    assert scales == {"to_q": 0.5, "to_k": 0.5, "to_v": 0.25}
    import importlib.util
    if importlib.util.find_spec("peft") is not None:  # PEFT's own resolver agrees, where it is installed
        _import_hf()
        from peft.utils.other import get_pattern_key
        for p in scales:
            assert scales[p] == pats.get(get_pattern_key(list(pats), f"transformer_blocks.0.attn.{p}"), 8) / r
    assert m.files[0].modules["transformer.transformer_blocks.0.attn.to_q"].alpha_where.endswith("alpha_pattern")


def _one_lora(path, alpha=None, scale=1.0, metadata=None):
    b, a = _lora_pair(24, 8, 2, seed=1)
    t = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": a,
         "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": b * scale}
    if alpha is not None:
        t["lora_unet_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(alpha)
    save_file(t, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize("entry", ["merge_state_dict", "merge_state_dict_list", "from_files", "from_state_dicts",
                                   "node_load_lora_file", "convert_file", "not_a_number"])
def test_a_non_finite_strength_is_refused_at_every_entry_point(tmp_path, entry):
    """The strength is checked wherever it enters (the single-value path included), naming the file:
    before, a NaN strength merged and was then blamed on the model ("weight has 4096 NaN")."""
    from convert_to_quant.quant_core.lora import load_lora_file
    from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
    p = _one_lora(tmp_path / "l.safetensors")
    base = _flux_base(8, single=False)
    nan, inf = float("nan"), float("inf")
    calls = {
        "merge_state_dict": (lambda: merge_state_dict(base, [p], nan), r"l\.safetensors: LoRA strength nan is not a finite"),
        "merge_state_dict_list": (lambda: merge_state_dict(base, [p, p], [1.0, -inf]),
                                  r"l\.safetensors: LoRA strength -inf is not a finite"),
        "from_files": (lambda: LoraMerger.from_files(p, inf), r"LoRA strength inf is not a finite"),
        "from_state_dicts": (lambda: LoraMerger.from_state_dicts([{}], nan, names=["mine"]),
                             r"mine: LoRA strength nan is not a finite"),
        # what the ComfyUI "Merge LoRA" node calls with its strength widget's value
        "node_load_lora_file": (lambda: load_lora_file(p, nan), r"l\.safetensors: LoRA strength nan is not a finite"),
        "convert_file": (lambda: convert_file(str(save_file(base, str(tmp_path / "m.safetensors"))),
                                              str(tmp_path / "o.safetensors"),
                                              ConvertOptions(loras=[p], lora_strengths=[nan])),
                         r"LoRA strength nan is not a finite"),
        "not_a_number": (lambda: merge_state_dict(base, [p], "strong"), r"LoRA strength 'strong' is not a number"),
    }
    fn, match = calls[entry]
    with pytest.raises(LoRAError, match=match):
        fn()
    assert not os.path.exists(tmp_path / "o.safetensors")


@pytest.mark.parametrize("case,match", [
    ("strength_times_alpha_is_inf", r"l\.safetensors: merging lora_unet_double_blocks_0_img_attn_qkv into "
     r"double_blocks\.0\.img_attn\.qkv\.weight makes 192 values NaN or Inf: strength 1e\+200 x alpha 1e\+200 from "
     r"l\.safetensors metadata\['ss_network_alpha'\] / rank 2 = inf is not finite"),
    ("metadata_alpha_overflows", r"the delta scaled by strength 10 x alpha 1e\+38 from l\.safetensors "
     r"metadata\['ss_network_alpha'\] / rank 2 = 5e\+38 overflows float32"),
    ("factors_overflow", r"the LoRA's own delta \(its factors multiplied out\) overflows float32"),
])
def test_merge_made_non_finite_values_name_the_lora_and_the_cause(tmp_path, case, match):
    base = _flux_base(8, single=False)
    p = {"strength_times_alpha_is_inf": lambda: _one_lora(tmp_path / "l.safetensors",
                                                          metadata={"ss_network_alpha": "1e200"}),
         "metadata_alpha_overflows": lambda: _one_lora(tmp_path / "l.safetensors",
                                                       metadata={"ss_network_alpha": "1e38"}),
         "factors_overflow": lambda: _one_lora(tmp_path / "l.safetensors", scale=1e38)}[case]()
    strength = {"strength_times_alpha_is_inf": 1e200, "metadata_alpha_overflows": 10.0}.get(case, 1.0)
    with pytest.raises(LoRAError, match=match):
        merge_state_dict(base, [p], strength)


def test_input_nan_is_kept_but_merge_made_inf_is_refused_even_with_nan_policy_keep(tmp_path):
    """``--nan-policy keep`` keeps what the *input* had: a NaN of the model stays where it was and the
    rest of the layer is base + delta; a LoRA that makes other values Inf is still refused."""
    from convert_to_quant.quant_core.pipeline import ConvertOptions, convert_file
    base = _flux_base(8, single=False)
    key = "double_blocks.0.img_attn.qkv.weight"
    base[key][3, 4] = float("nan")
    model = save_file(base, str(tmp_path / "m.safetensors"))
    p = _one_lora(tmp_path / "l.safetensors")
    b, a = _lora_pair(24, 8, 2, seed=1)
    convert_file(model, str(tmp_path / "o.safetensors"), ConvertOptions(loras=[p], nan_policy="keep"))
    got = load_file(str(tmp_path / "o.safetensors"))[key]
    assert got.dtype == torch.float32  # kept unquantized
    want = (base[key].double() + b.double() @ a.double()).float()
    nan = torch.isnan(got)
    assert nan.sum() == 1 and bool(nan[3, 4])
    assert torch.allclose(got[~nan], want[~nan], rtol=1e-6, atol=1e-6)
    with pytest.raises(LoRAError, match=r"merging lora_unet_double_blocks_0_img_attn_qkv into "
                                        r"double_blocks\.0\.img_attn\.qkv\.weight makes \d+ values NaN or Inf"):
        convert_file(model, str(tmp_path / "o2.safetensors"),
                     ConvertOptions(loras=[p], lora_strengths=[1e38], nan_policy="keep"))
    assert not os.path.exists(tmp_path / "o2.safetensors")


def test_dora_on_a_zero_row_names_the_renormalization():
    """PEFT DoRA divides by the row norm of the merged weight: a row that is zero before and after the
    LoRA gives 0/0; the error says so instead of blaming the model."""
    w = _rand(4, 4, seed=1)
    w[2] = 0
    up = _rand(4, 2, seed=2)
    up[2] = 0
    lora = {"x.lora_A.weight": _rand(2, 4, seed=3), "x.lora_B.weight": up, "x.lora_magnitude_vector": torch.ones(4)}
    with pytest.raises(LoRAError, match=r"lora\[0\]: merging x into x\.weight makes 4 values NaN or Inf: the DoRA "
                                        r"renormalization .* divides by a zero or overflowing row norm"):
        _merge({"x.weight": w}, [lora])


def test_metadata_alpha_errors_name_the_file_and_key_and_fallbacks_stay(tmp_path):
    base = _flux_base(8, single=False)
    # kohya writes "None" when no alpha was set: not a number, so alpha falls back to the rank (scale 1)
    m = LoraMerger.from_files(_one_lora(tmp_path / "none.safetensors", metadata={"ss_network_alpha": "None"}))
    m.bind(_infos(base))
    assert m.files[0].modules["lora_unet_double_blocks_0_img_attn_qkv"].scale == 1.0
    # free-text metadata that merely mentions lora_alpha is not a config, and not an error
    m = LoraMerger.from_files(_one_lora(tmp_path / "note.safetensors", metadata={
        "ss_training_comment": "trained with lora_alpha = " + "[" * 50_000}))
    m.bind(_infos(base))
    assert m.files[0].modules["lora_unet_double_blocks_0_img_attn_qkv"].alpha is None
    with pytest.raises(LoRAError, match=r"x\.safetensors metadata\['ss_network_alpha'\] must be a finite number, got nan"):
        LoraMerger.from_files(_one_lora(tmp_path / "x.safetensors", metadata={"ss_network_alpha": "nan"}))
