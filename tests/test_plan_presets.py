"""Plan and presets: every seed preset's skip list on a key list of its family, detection, layer-config,
regex options, fallback, dry-run."""
import json
import os

import pytest

from convert_to_quant.quant_core import presets as P
from convert_to_quant.quant_core.errors import PlanError
from convert_to_quant.quant_core.formats import make_spec
from convert_to_quant.quant_core.plan import (PlanOptions, build_plan, layer_config_template, parse_layer_config)
from convert_to_quant.quant_core.safetensors_io import TensorInfo

L = (256, 256)  # any 2-D linear shape


def infos(spec):
    """{key: shape or (shape, dtype)} -> TensorInfo dict with consistent offsets."""
    out, pos = {}, 0
    for k, v in spec.items():
        shape, dt = (v, "BF16") if not (len(v) == 2 and isinstance(v[1], str)) else v
        n = 2
        for d in shape:
            n *= d
        out[k] = TensorInfo(k, dt, tuple(shape), pos, pos + n)
        pos += n
    return out


# family -> (keys, expected kept (high precision), expected quantized, expected dropped)
FAMILIES = {
    "flux2": ({
        "double_stream_modulation_img.lin.weight": L, "double_stream_modulation_txt.lin.weight": L,
        "single_stream_modulation.lin.weight": L, "img_in.weight": L, "txt_in.weight": L,
        "time_in.in_layer.weight": L, "guidance_in.in_layer.weight": L, "final_layer.linear.weight": L,
        "double_blocks.0.img_attn.qkv.weight": L, "double_blocks.0.img_attn.proj.weight": L,
        "double_blocks.0.img_attn.norm.query_norm.scale": (64,), "single_blocks.0.linear1.weight": L,
        "single_blocks.0.linear2.weight": L,
    }, ["double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin", "img_in",
        "txt_in", "time_in.in_layer", "guidance_in.in_layer", "final_layer.linear"],
        ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "single_blocks.0.linear1",
         "single_blocks.0.linear2"], []),
    "distillation_large": ({
        "distilled_guidance_layer.in_proj.weight": L, "distilled_guidance_layer.layers.0.in_layer.weight": L,
        "img_in.weight": L, "txt_in.weight": L, "final_layer.linear.weight": L,
        "double_blocks.0.img_attn.qkv.weight": L, "double_blocks.0.txt_mlp.0.weight": L,
        "single_blocks.0.linear1.weight": L,
    }, ["distilled_guidance_layer.in_proj", "distilled_guidance_layer.layers.0.in_layer", "img_in", "txt_in",
        "final_layer.linear"],
        ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.0", "single_blocks.0.linear1"], []),
    "distillation_small": ({
        "distilled_guidance_layer.in_proj.weight": L, "img_in.weight": L, "txt_in.weight": L,
        "final_layer.linear.weight": L, "double_blocks.0.img_attn.qkv.weight": L,
    }, ["distilled_guidance_layer.in_proj"],
        ["img_in", "txt_in", "final_layer.linear", "double_blocks.0.img_attn.qkv"], []),
    "nerf_large": ({
        "nerf_blocks.0.param_generator.weight": L, "nerf_image_embedder.embedder.0.weight": L,
        "distilled_guidance_layer.in_proj.weight": L, "txt_in.weight": L, "img_in_patch.weight": L,
        "double_blocks.0.img_attn.qkv.weight": L, "nerf_final_layer.linear.weight": L,
    }, ["nerf_blocks.0.param_generator", "nerf_image_embedder.embedder.0", "distilled_guidance_layer.in_proj",
        "txt_in"], ["img_in_patch", "double_blocks.0.img_attn.qkv", "nerf_final_layer.linear"], []),
    "nerf_small": ({
        "nerf_blocks.0.param_generator.weight": L, "nerf_image_embedder.embedder.0.weight": L,
        "distilled_guidance_layer.in_proj.weight": L, "txt_in.weight": L,
        "double_blocks.0.img_attn.qkv.weight": L,
    }, ["nerf_blocks.0.param_generator", "nerf_image_embedder.embedder.0", "distilled_guidance_layer.in_proj"],
        ["txt_in", "double_blocks.0.img_attn.qkv"], []),
    "radiance": ({
        "img_in_patch.weight": L, "nerf_final_layer_conv.linear.weight": L, "nerf_blocks.0.param_generator.weight": L,
        "__x0__": (1,), "double_blocks.0.img_attn.qkv.weight": L,
    }, ["img_in_patch", "nerf_final_layer_conv.linear"], ["nerf_blocks.0.param_generator",
                                                          "double_blocks.0.img_attn.qkv"], []),
    "wan": ({
        "patch_embedding.weight": (256, 16, 1, 2, 2), "text_embedding.0.weight": L, "text_embedding.2.weight": L,
        "time_embedding.0.weight": L, "time_projection.1.weight": L, "blocks.0.self_attn.q.weight": L,
        "blocks.0.self_attn.o.weight": L, "blocks.0.self_attn.norm_q.weight": (256,),
        "blocks.0.cross_attn.k.weight": L, "blocks.0.ffn.0.weight": L, "blocks.0.ffn.2.weight": L,
        "blocks.0.modulation": (1, 6, 256), "head.head.weight": L, "head.modulation": (1, 2, 256),
        "img_emb.proj.1.weight": L,
    }, ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_projection.1", "head.head",
        "img_emb.proj.1"],
        ["blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.0.cross_attn.k", "blocks.0.ffn.0",
         "blocks.0.ffn.2"], []),
    "hunyuan": ({
        "img_in.proj.weight": L, "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight": L,
        "double_blocks.0.img_attn_qkv.weight": L, "double_blocks.0.img_attn_q_norm.weight": L,
        "double_blocks.0.txt_attn_k_norm.weight": L, "double_blocks.0.img_mlp.fc1.weight": L,
        "single_blocks.0.linear1.weight": L, "single_blocks.0.norm1.linear.weight": L,
        "vision_in.proj.0.weight": L, "vision_in.proj.4.weight": L, "vision_in.proj.1.weight": L,
        "cond_type_embedding.weight": L, "txt_in.individual_token_refiner.blocks.0.norm2.weight": L,
    }, ["img_in.proj", "double_blocks.0.img_attn_q_norm", "double_blocks.0.txt_attn_k_norm",
        "single_blocks.0.norm1.linear", "vision_in.proj.0", "vision_in.proj.4", "cond_type_embedding",
        "txt_in.individual_token_refiner.blocks.0.norm2"],
        ["txt_in.individual_token_refiner.blocks.0.self_attn_qkv", "double_blocks.0.img_attn_qkv",
         "double_blocks.0.img_mlp.fc1", "single_blocks.0.linear1", "vision_in.proj.1"], []),
    "qwen": ({
        "img_in.weight": L, "txt_in.weight": L, "txt_norm.weight": L,
        "time_text_embed.timestep_embedder.linear_1.weight": L, "transformer_blocks.0.img_mod.1.weight": L,
        "transformer_blocks.1.img_mod.1.weight": L, "transformer_blocks.0.attn.to_q.weight": L,
        "transformer_blocks.0.attn.add_q_proj.weight": L, "transformer_blocks.0.txt_mlp.net.0.proj.weight": L,
        "norm_out.linear.weight": L, "proj_out.weight": L,
    }, ["img_in", "txt_in", "txt_norm", "time_text_embed.timestep_embedder.linear_1",
        "transformer_blocks.0.img_mod.1", "norm_out.linear", "proj_out"],
        ["transformer_blocks.1.img_mod.1", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_q_proj",
         "transformer_blocks.0.txt_mlp.net.0.proj"], []),
    "zimage": ({
        "x_embedder.weight": L, "cap_embedder.1.weight": L, "t_embedder.mlp.0.weight": L,
        "layers.0.attention.qkv.weight": L, "layers.0.attention.out.weight": L,
        "layers.0.adaLN_modulation.0.weight": L, "layers.0.feed_forward.w1.weight": L,
        "final_layer.linear.weight": L, "x_pad_token": (1, 256),
    }, ["x_embedder", "cap_embedder.1", "t_embedder.mlp.0", "layers.0.adaLN_modulation.0", "final_layer.linear"],
        ["layers.0.attention.qkv", "layers.0.attention.out", "layers.0.feed_forward.w1"], []),
    "zimage_refiner": ({
        "x_embedder.weight": L, "cap_embedder.1.weight": L, "noise_refiner.0.attention.qkv.weight": L,
        "context_refiner.0.feed_forward.w2.weight": L, "layers.0.attention.qkv.weight": L,
    }, ["x_embedder", "cap_embedder.1", "noise_refiner.0.attention.qkv", "context_refiner.0.feed_forward.w2"],
        ["layers.0.attention.qkv"], []),
    "t5xxl": ({
        "shared.weight": L, "encoder.block.0.layer.0.SelfAttention.q.weight": L,
        "encoder.block.0.layer.0.SelfAttention.o.weight": L,
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 64),
        "encoder.block.0.layer.0.layer_norm.weight": (256,), "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": L,
        "encoder.block.0.layer.1.DenseReluDense.wo.weight": L, "encoder.final_layer_norm.weight": (256,),
        "decoder.block.0.layer.0.SelfAttention.q.weight": L, "lm_head.weight": L,
    }, ["shared", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"],
        ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.0.layer.0.SelfAttention.o",
         "encoder.block.0.layer.1.DenseReluDense.wi_0", "encoder.block.0.layer.1.DenseReluDense.wo"],
        ["decoder.block.0.layer.0.SelfAttention.q.weight", "lm_head.weight"]),
    "mistral": ({
        "model.embed_tokens.weight": L, "model.layers.0.self_attn.q_proj.weight": L,
        "model.layers.0.self_attn.o_proj.weight": L, "model.layers.0.mlp.gate_proj.weight": L,
        "model.layers.0.input_layernorm.weight": (256,), "model.norm.weight": (256,), "lm_head.weight": L,
        "multi_modal_projector.linear_1.weight": L,
    }, ["model.embed_tokens", "lm_head", "multi_modal_projector.linear_1"],
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj"], []),
    "visual": ({
        "visual.blocks.0.attn.qkv.weight": L, "visual.blocks.0.mlp.down_proj.weight": L,
        "visual.blocks.0.mlp.up_proj.weight": L, "visual.blocks.0.mlp.gate_proj.weight": L,
        "visual.merger.mlp.0.weight": L,
    }, ["visual.blocks.0.mlp.down_proj", "visual.blocks.0.mlp.up_proj", "visual.blocks.0.mlp.gate_proj"],
        ["visual.blocks.0.attn.qkv", "visual.merger.mlp.0"], []),
    "lora": ({
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (16, 256),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (768, 16),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": (),
        "some.scale.weight": L,
    }, ["some.scale"], ["lora_unet_double_blocks_0_img_attn_qkv.lora_down",
                        "lora_unet_double_blocks_0_img_attn_qkv.lora_up"], []),
}


def test_all_seed_presets_exist_as_data():
    seed = {"flux2", "lora", "t5xxl", "mistral", "visual", "hunyuan", "wan", "qwen", "zimage", "zimage_refiner",
            "distillation_large", "distillation_small", "nerf_large", "nerf_small", "radiance"}
    presets = P.all_presets()
    assert seed <= set(presets)
    assert {n for n, p in presets.items() if p.seed_preset} == seed
    assert "mm_input_projection_weight" in P.default_skip() and "norm" in P.default_skip()
    seed_avoid = json.load(open(os.path.join(P.PRESET_DIR, "default.json")))["skip"]
    assert len(seed_avoid) == 31 and set(seed_avoid) <= set(P.default_skip())
    # embedding tables are never quantized as linear layers (CLIP, BERT, GPT-style names)
    plan = build_plan(infos({"text_model.embeddings.token_embedding.weight": (49408, 768),
                             "text_model.embeddings.position_embedding.weight": (77, 768),
                             "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768)}), PlanOptions())
    assert [b for b, lp in plan.layers.items() if lp.spec is not None] == ["text_model.encoder.layers.0.mlp.fc1"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_preset_skip_list_on_family_keys(family):
    keys, kept, quantized, dropped = FAMILIES[family]
    plan = build_plan(infos(keys), PlanOptions(presets=[family]))
    got_kept = {b for b, lp in plan.layers.items() if lp.spec is None}
    got_q = {b for b, lp in plan.layers.items() if lp.spec is not None}
    assert got_kept == set(kept)
    assert got_q == set(quantized)
    assert set(plan.dropped) == set(dropped)
    # non-2-D tensors are never layers; they pass through
    for k, shape in keys.items():
        if len(shape) != 2:
            assert k[:-7] not in plan.layers
    out_keys = {e.key for e in plan.output_entries()}
    for d in dropped:
        assert d not in out_keys


DETECT = {"flux2": "flux2", "distillation_large": "distillation_large", "nerf_large": "nerf_large",
          "radiance": "radiance", "wan": "wan", "hunyuan": "hunyuan", "qwen": "qwen", "zimage": "zimage",
          "zimage_refiner": "zimage_refiner", "t5xxl": "t5xxl", "mistral": "mistral", "visual": "visual",
          "lora": "lora"}


@pytest.mark.parametrize("family", list(DETECT))
def test_auto_detects_family(family):
    keys = FAMILIES[family][0]
    assert P.detect_family(keys) == DETECT[family]
    plan = build_plan(infos(keys), PlanOptions(presets=["auto"]))
    assert plan.presets == [DETECT[family]]
    assert any("detected model family" in n for n in plan.notes)


def test_detects_flux1_and_bert(minilm_path):
    from convert_to_quant.quant_core.safetensors_io import read_header
    assert P.detect_family(read_header(minilm_path)[0]) == "bert"
    flux1 = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight",
             "vector_in.in_layer.weight"]
    assert P.detect_family(flux1) == "flux"
    assert P.detect_family(["foo.weight"]) is None


def test_no_preset_suggests_the_detected_one():
    plan = build_plan(infos(FAMILIES["wan"][0]), PlanOptions())
    assert plan.presets == [] and any("--wan" in n for n in plan.notes)


def test_custom_exclude_and_fullmatch():
    keys = {"blocks.0.attn.q.weight": L, "blocks.0.attn.k.weight": L, "blocks.1.ffn.weight": L}
    plan = build_plan(infos(keys), PlanOptions(exclude_layers=r"attn\.k", custom_layers=r"ffn",
                                               custom_spec=make_spec(format="fp16")))
    assert plan.layers["blocks.0.attn.k"].spec is None
    assert plan.layers["blocks.1.ffn"].spec.format == "fp16"
    assert plan.layers["blocks.0.attn.q"].spec.format == "int8_tensorwise"
    plan = build_plan(infos(keys), PlanOptions(exclude_layers=r"attn", fullmatch=True))
    assert all(lp.spec is not None for lp in plan.layers.values())  # "attn" is no full match


def test_layer_config_first_match_wins_and_overrides_presets():
    keys = {"blocks.0.self_attn.q.weight": L, "blocks.0.ffn.0.weight": L, "head.head.weight": L,
            "text_embedding.0.weight": (256, 200)}
    rules = parse_layer_config({
        "_comment": "ignored",
        r"ffn\.0": {"format": "int8_blockwise", "block_size": 64},
        r"ffn": {"skip": True},
        r"head\.head": {"format": "int8_tensorwise", "scaling_mode": "tensor"},
        r"text_embedding": {"convrot": True, "convrot_groupsize": 64},
    }, make_spec())
    plan = build_plan(infos(keys), PlanOptions(presets=["wan"], layer_config=rules))
    assert plan.layers["blocks.0.ffn.0"].spec.describe() == "int8_blockwise/64"
    assert plan.layers["head.head"].spec.describe() == "int8_tensorwise/tensor"
    assert plan.layers["blocks.0.self_attn.q"].spec.describe() == "int8_tensorwise/row"
    te = plan.layers["text_embedding.0"]  # 200 is not divisible by 64 or 16 -> per-row, and says why
    assert te.spec.describe() == "int8_tensorwise/row" and "200" in te.fallback_reason


@pytest.mark.parametrize("bad,msg", [
    ({"(unclosed": {"skip": True}}, "invalid regex"),
    ({"x": {"formatt": "fp16"}}, "unknown field"),
    ({"x": {"format": "int3"}}, "unknown format"),
    ({"x": {"convrot": True, "convrot_groupsize": 100}}, "must be one of 16, 64, 256, 1024, got 100"),
    (["not", "an", "object"], "JSON object"),
])
def test_bad_layer_config_is_a_clear_error(bad, msg):
    with pytest.raises(PlanError, match=msg):
        parse_layer_config(bad, make_spec())


def test_template_round_trips_to_the_same_plan():
    keys = FAMILIES["wan"][0]
    plan = build_plan(infos(keys), PlanOptions(presets=["wan"], spec=make_spec(convrot=True, convrot_groupsize=64)))
    tpl = json.loads(json.dumps(layer_config_template(plan)))
    plan2 = build_plan(infos(keys), PlanOptions(layer_config=parse_layer_config(tpl, make_spec())))
    assert {b: lp.describe() for b, lp in plan.layers.items()} == {b: lp.describe() for b, lp in plan2.layers.items()}


def test_fallback_fp16_option_and_estimate():
    keys = {"a.weight": (64, 200), "b.weight": (64, 256)}
    plan = build_plan(infos(keys), PlanOptions(spec=make_spec(scaling_mode="block"), fallback="fp16"))
    assert plan.layers["a"].spec.format == "fp16" and "not divisible" in plan.layers["a"].fallback_reason
    assert plan.layers["b"].spec.format == "int8_blockwise"
    est = plan.estimate()
    # b: 64*256 int8 + 1x2 fp32 scales + comfy_quant json; a: fp16 (same bytes as bf16)
    assert est["bytes_in"] == (64 * 200 + 64 * 256) * 2
    assert est["bytes_out"] == 64 * 200 * 2 + 64 * 256 + 2 * 4 + len(b'{"format":"int8_blockwise","group_size":128}')
