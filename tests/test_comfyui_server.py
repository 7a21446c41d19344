"""The node pack inside a real ComfyUI server, driven through its HTTP API like users and API clients do.

Model: a small generated Wan 2.1 T2V (dim 256, 2 blocks, ffn 512) that ComfyUI's own model detection
recognises from its weights; it has a 5-D patch-embedding conv that must pass through unchanged.
Skipped unless COMFYUI_DIR / COMFYUI_PYTHON point at a ComfyUI checkout and its python.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_helpers import (OUR_NODES, SKIP_REASON, ComfyServer, PromptRejected, comfy_env,  # noqa: E402
                           execution_error, latest_latent, read_latent, rel_err, sample_nodes, save_tensors,
                           status_messages, ui_outputs, wan21_lora, wan21_state_dict)

from convert_to_quant.quant_core.loading import read_quantized_layers  # noqa: E402
from convert_to_quant.quant_core.safetensors_io import SafetensorsReader  # noqa: E402

pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(comfy_env() is None, reason=SKIP_REASON)]

MODEL = "wan_tiny.safetensors"
LORA = "wan_lora.safetensors"
INT8 = "ctq/wan_tiny_int8.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("comfy"))
    save_tensors(os.path.join(base, "models", "diffusion_models", MODEL), wan21_state_dict())
    save_tensors(os.path.join(base, "models", "loras", LORA), wan21_lora())
    srv = ComfyServer(base)
    yield srv
    srv.stop()


def quantize_node(weights_ref, **kw):
    inputs = {"weights": weights_ref, "format": "int8_tensorwise", "scaling": "axis", "block_size": 128,
              "convrot": False, "convrot_group_size": "256", "preset": "auto", "optimizer": "rtn",
              "num_iter": 10, "lr": 0.01, "device": "cpu"}
    inputs.update(kw)
    return {"class_type": "QuantQuantize", "inputs": inputs}


def convert_prompt(filename, overwrite=False, **quant):
    return {"1": {"class_type": "QuantLoadWeights", "inputs": {"weights": f"diffusion_models/{MODEL}"}},
            "2": quantize_node(["1", 0], **quant),
            "3": {"class_type": "QuantQualityReport", "inputs": {"quantized": ["2", 0]}},
            "4": {"class_type": "QuantSave", "inputs": {"quantized": ["2", 0], "folder": "diffusion_models",
                                                        "filename": filename, "overwrite": overwrite,
                                                        "save_report": True}}}


def ok(entry):
    err = execution_error(entry)
    assert entry["status"]["status_str"] == "success", json.dumps(err or status_messages(entry))[:3000]
    return entry


@pytest.fixture(scope="module")
def converted(server):
    """convert -> report -> save through POST /prompt (shared by the tests that need the int8 file)."""
    entry = ok(server.run(convert_prompt(INT8)))
    return entry


def test_object_info_lists_every_node(server):
    info = server.get("/object_info")
    missing = [n for n in OUR_NODES if n not in info]
    assert not missing, f"not registered: {missing}"
    q = info["QuantQuantize"]["input"]
    assert "int8_blockwise" in q["required"]["format"][0] and "auto" in q["required"]["preset"][0]
    assert "calibration" in q["optional"]
    assert f"diffusion_models/{MODEL}" in info["QuantLoadWeights"]["input"]["required"]["weights"][0]


def test_convert_report_save(server, converted):
    path = server.models("diffusion_models", *INT8.split("/"))
    assert os.path.isfile(path)
    # the quality report node: summary text, per-layer rows for the web widget
    ui = ui_outputs(converted, "3")
    assert "layers quantized: 20" in ui["text"][0]
    rep = ui["quant_report"][0]
    rows = {r[0]: dict(zip(rep["columns"], r)) for r in rep["rows"]}
    assert rows["blocks.0.self_attn.q"]["quantized"] and rows["blocks.0.self_attn.q"]["sqnr_db"] > 35
    assert not rows["text_embedding.0"]["quantized"]  # the wan preset (auto) keeps embeddings
    # the file: int8 layers readable the way a loader reads them; the 5-D conv copied unchanged
    src = wan21_state_dict()
    with SafetensorsReader(path) as r:
        layers, others = read_quantized_layers(r)
        assert len(layers) == 20 and all(q.qdata.dtype == torch.int8 for q in layers.values())
        conv = r.get("patch_embedding.weight")
    assert conv.dim() == 5 and torch.equal(conv, src["patch_embedding.weight"])
    assert torch.equal(others["text_embedding.0.weight"], src["text_embedding.0.weight"])
    # report files next to it; no temporary file left besides the cached conversion
    assert os.path.isfile(path[:-len(".safetensors")] + "_quality.json")
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.endswith(".partial")]
    # issue 15: the Save node says where it saved; the saved report names the saved file (not the
    # temporary one) and has the model's permissions (not mkstemp's 0600)
    saved = ui_outputs(converted, "4")["text"][0]
    assert saved.startswith(f"saved diffusion_models/{INT8} (") and "_quality.json" in saved, saved
    stem = path[:-len(".safetensors")] + "_quality"
    with open(stem + ".json") as f:
        assert json.load(f)["summary"]["output"] == f"diffusion_models/{INT8}"
    mode = os.stat(path).st_mode & 0o777
    assert mode & 0o044 and [os.stat(stem + e).st_mode & 0o777 for e in (".json", ".md")] == [mode, mode]
    assert ".convert_to_quant_tmp" not in json.dumps(ui_outputs(converted, "3"))


def _latent(server, prefix):
    return read_latent(latest_latent(server.output(), prefix))


def test_load_quantized_and_sample_close_to_float(server, converted):
    prompt = {"10": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
              "20": {"class_type": "QuantDiffusionModelLoader",
                     "inputs": {"unet_name": INT8, "compute_dtype": "default"}}}
    prompt.update(sample_nodes(["10", 0], "float", start=100))
    prompt.update(sample_nodes(["20", 0], "int8", start=200))
    prompt.update(sample_nodes(["10", 0], "float_seed8", seed=8, start=300))
    ok(server.run(prompt))
    ref, q, other = _latent(server, "float"), _latent(server, "int8"), _latent(server, "float_seed8")
    assert ref.shape == (1, 16, 1, 8, 8)
    err = rel_err(q, ref)
    # int8 (W8A8) output is within a few % of the float model; a different seed is ~100% away
    assert err < 0.05, err
    assert rel_err(other, ref) > 10 * err


def test_stock_lora_loader_on_int8_model_matches_float_lora(server, converted):
    lora = {"lora_name": LORA, "strength_model": 1.0}
    prompt = {"10": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
              "11": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["10", 0], **lora}},
              "20": {"class_type": "QuantDiffusionModelLoader", "inputs": {"unet_name": INT8,
                                                                           "compute_dtype": "default"}},
              "21": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["20", 0], **lora}}}
    prompt.update(sample_nodes(["10", 0], "nolora", start=100))
    prompt.update(sample_nodes(["11", 0], "floatlora", start=200))
    prompt.update(sample_nodes(["21", 0], "int8lora", start=300))
    ok(server.run(prompt))
    ref, ref_lora, q_lora = _latent(server, "nolora"), _latent(server, "floatlora"), _latent(server, "int8lora")
    effect, err = rel_err(ref_lora, ref), rel_err(q_lora, ref_lora)
    assert err < 0.05 and effect > 5 * err, (err, effect)


def test_merge_lora_then_quantize_matches_runtime_lora(server):
    prompt = {"1": {"class_type": "QuantLoadWeights", "inputs": {"weights": f"diffusion_models/{MODEL}"}},
              "5": {"class_type": "QuantMergeLoRA", "inputs": {"weights": ["1", 0], "lora_1": LORA,
                                                               "strength_1": 1.0}},
              "2": quantize_node(["5", 0]),
              "4": {"class_type": "QuantSave", "inputs": {"quantized": ["2", 0], "folder": "diffusion_models",
                                                          "filename": "ctq/wan_merged_int8", "overwrite": True,
                                                          "save_report": False}}}
    ok(server.run(prompt))
    assert os.path.isfile(server.models("diffusion_models", "ctq", "wan_merged_int8.safetensors"))
    prompt = {"10": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
              "11": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["10", 0], "lora_name": LORA,
                                                                     "strength_model": 1.0}},
              "20": {"class_type": "QuantDiffusionModelLoader",
                     "inputs": {"unet_name": "ctq/wan_merged_int8.safetensors", "compute_dtype": "default"}}}
    prompt.update(sample_nodes(["11", 0], "mlref", start=100))
    prompt.update(sample_nodes(["20", 0], "merged", start=200))
    ok(server.run(prompt))
    assert rel_err(_latent(server, "merged"), _latent(server, "mlref")) < 0.05


def test_on_the_fly_quantize(server):
    prompt = {"10": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
              "11": {"class_type": "QuantizeModelOnTheFly",
                     "inputs": {"model": ["10", 0], "format": "int8_tensorwise", "convrot": True,
                                "convrot_group_size": "256", "block_size": 128, "preset": "auto"}}}
    prompt.update(sample_nodes(["10", 0], "otf_ref", start=100))
    prompt.update(sample_nodes(["11", 0], "otf_q", start=200))
    ok(server.run(prompt))
    assert rel_err(_latent(server, "otf_q"), _latent(server, "otf_ref")) < 0.05


@pytest.mark.parametrize("name, why", [("../escape", "'..'"), ("ctq/../../escape", "'..'"),
                                       ("/tmp/ctq_escape", "absolute"), ("bad\x00name", "NUL")])
def test_save_refuses_names_that_escape(server, converted, name, why):
    entry = server.run(convert_prompt(name))
    err = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and err is not None
    assert err["node_type"] == "QuantSave" and why in err["exception_message"], err["exception_message"]
    models = server.models()
    assert not os.path.exists(os.path.join(models, "escape.safetensors"))
    assert not os.path.exists(os.path.join(server.base, "escape.safetensors"))
    assert not os.path.exists("/tmp/ctq_escape.safetensors")


def test_save_refuses_to_overwrite_unless_asked(server, converted):
    path = server.models("diffusion_models", *INT8.split("/"))
    before = os.stat(path).st_mtime_ns
    entry = server.run(convert_prompt(INT8, quality_threshold=29.0))
    err = execution_error(entry)
    assert err is not None and "already exists" in err["exception_message"]
    assert os.stat(path).st_mtime_ns == before
    ok(server.run(convert_prompt(INT8, overwrite=True, quality_threshold=29.0)))


def test_cancel_mid_conversion_leaves_no_file(server):
    """/interrupt during a slow (learned-rounding) conversion: the prompt stops at the next layer boundary,
    no partial or temporary file remains and nothing is saved."""
    tmp_dir = server.output(".convert_to_quant_tmp")
    before = set(os.listdir(tmp_dir)) if os.path.isdir(tmp_dir) else set()
    target = server.models("diffusion_models", "ctq", "cancelled.safetensors")
    pid = server.queue(convert_prompt("ctq/cancelled", optimizer="original", num_iter=40))
    t0 = time.time()
    while time.time() - t0 < 120:
        now = set(os.listdir(tmp_dir)) if os.path.isdir(tmp_dir) else set()
        if any(n.endswith(".partial") for n in now - before):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the conversion never started writing")
    time.sleep(0.5)  # inside the conversion (20 layers of learned rounding)
    t_int = time.time()
    server.interrupt()
    entry = server.wait(pid, timeout=120)
    stop_seconds = time.time() - t_int
    kinds = [k for k, _ in status_messages(entry)]
    assert "execution_interrupted" in kinds, kinds
    assert not os.path.exists(target)
    leftovers = set(os.listdir(tmp_dir)) - before
    assert not leftovers, leftovers
    assert stop_seconds < 30, stop_seconds


def test_inspect_route(server):
    status, info = server.request("GET", f"/convert_to_quant/inspect?weights=diffusion_models/{MODEL}")
    assert status == 200, info
    assert info["family"] == "wan" and info["linear_layers"] == 26 and info["layers_to_quantize"] == 20
    assert info["size_bytes"] == os.path.getsize(server.models("diffusion_models", MODEL))
    status, info = server.request("GET", "/convert_to_quant/inspect?weights=diffusion_models/../../etc/passwd")
    assert status == 400 and "no such file" in info["error"]


def test_quantize_errors_are_clear(server):
    bad = convert_prompt("ctq/never", layer_config="{not json")
    entry = server.run(bad)
    err = execution_error(entry)
    assert err["node_type"] == "QuantQuantize" and "layer_config is not valid JSON" in err["exception_message"]
    with pytest.raises(PromptRejected):
        server.queue({"1": {"class_type": "QuantLoadWeights", "inputs": {"weights": "diffusion_models/nope"}}})
    assert not os.path.exists(server.models("diffusion_models", "ctq", "never.safetensors"))


def test_calibration_capture_feeds_quantize(server):
    """Capture statistics from a real sampling run (the user's conditioning), then quantize with GPTQ and
    with RTN on them: the calibrated optimizer must give the better layer outputs on those activations."""
    prompt = sample_nodes(["10", 0], "calib", start=100)
    del prompt["103"], prompt["104"]  # keep conditioning + latent, sampling happens in the capture node
    prompt["10"] = {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}}
    prompt["30"] = {"class_type": "QuantCalibrationCapture", "inputs": {
        "model": ["10", 0], "positive": ["100", 0], "negative": ["101", 0], "latent_image": ["102", 0], "seed": 1,
        "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "max_tokens_per_call": 4096,
        "budget_mb": 64}}
    prompt["1"] = {"class_type": "QuantLoadWeights", "inputs": {"weights": f"diffusion_models/{MODEL}"}}
    for nid, opt in (("2", "gptq"), ("5", "rtn")):
        prompt[nid] = quantize_node(["1", 0], optimizer=opt, calibration=["30", 0])
        prompt[nid + "1"] = {"class_type": "QuantQualityReport", "inputs": {"quantized": [nid, 0]}}
    entry = ok(server.run(prompt))
    cap = ui_outputs(entry, "30")["text"][0]
    assert "26 layers" in cap and "model calls" in cap, cap
    s_gptq = ui_outputs(entry, "21")["quant_report"][0]["summary"]
    s_rtn = ui_outputs(entry, "51")["quant_report"][0]["summary"]
    assert s_gptq["mean_output_sqnr_db"] > s_rtn["mean_output_sqnr_db"] + 1.0, (s_gptq, s_rtn)
    # the statistics file lives in the hidden temporary folder, not among the user's outputs
    assert not [n for n in os.listdir(server.output()) if n.endswith(".safetensors")]


# issue 15: calibration you keep -- Capture writes models/calibration/<name>, Quantize picks it from a combo
CALIB_NAME = "wan/tiny_calib"


def _capture_node(model_ref, name, overwrite=False, seed=1):
    return {"class_type": "QuantCalibrationCapture", "inputs": {
        "model": model_ref, "positive": ["100", 0], "negative": ["101", 0], "latent_image": ["102", 0],
        "seed": seed, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
        "max_tokens_per_call": 4096, "budget_mb": 64, "name": name, "overwrite": overwrite}}


def _saved_tensors(path):
    with SafetensorsReader(path) as r:
        return {k: (r.get(k).dtype, r.get(k).contiguous().view(torch.uint8).flatten().tolist()) for k in r.keys()}


def test_named_calibration_is_kept_and_picked_by_quantize(server):
    from convert_to_quant.quant_core.calibration import load_calibration
    from convert_to_quant.quant_core.presets import detect_family
    prompt = sample_nodes(["10", 0], "calib_named", start=100)
    del prompt["103"], prompt["104"]
    prompt["10"] = {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}}
    prompt["30"] = _capture_node(["10", 0], CALIB_NAME)
    prompt["1"] = {"class_type": "QuantLoadWeights", "inputs": {"weights": f"diffusion_models/{MODEL}"}}
    prompt["2"] = quantize_node(["1", 0], optimizer="gptq", calibration=["30", 0])  # wired directly
    prompt["4"] = {"class_type": "QuantSave", "inputs": {"quantized": ["2", 0], "folder": "diffusion_models",
                                                         "filename": "ctq/wired", "overwrite": False,
                                                         "save_report": False}}
    entry = ok(server.run(prompt))
    assert f"saved calibration/{CALIB_NAME}.safetensors" in ui_outputs(entry, "30")["text"][0]
    path = server.models("calibration", "wan", "tiny_calib.safetensors")
    assert os.path.isfile(path)  # kept after the graph ran (not the temporary file of an unnamed capture)
    data = load_calibration(path)
    try:
        meta = data.metadata
        assert meta["model_family"] == detect_family(wan21_state_dict()) == "wan"
        assert int(meta["prompts"]) >= 2 and int(meta["tokens"]) > 0
        assert len(json.loads(meta["layer_shapes"])) == 26
    finally:
        data.close()
    before = open(path, "rb").read()
    # the folder is a ComfyUI model folder: Quantize lists the file and uses it when nothing is connected
    combo = server.get("/object_info/QuantQuantize")["QuantQuantize"]["input"]["optional"]["calibration_file"][0]
    assert combo[0] == "none" and f"{CALIB_NAME}.safetensors" in combo, combo
    picked = {"1": prompt["1"], "2": quantize_node(["1", 0], optimizer="gptq",
                                                    calibration_file=f"{CALIB_NAME}.safetensors"),
              "4": {"class_type": "QuantSave", "inputs": {"quantized": ["2", 0], "folder": "diffusion_models",
                                                          "filename": "ctq/picked", "overwrite": False,
                                                          "save_report": False}}}
    ok(server.run(picked))
    wired = _saved_tensors(server.models("diffusion_models", "ctq", "wired.safetensors"))
    from_file = _saved_tensors(server.models("diffusion_models", "ctq", "picked.safetensors"))
    assert wired == from_file  # the same integers, byte for byte
    # the kept file feeds the CLI too: the same choice on the same model file gives the same integers
    cli_out = os.path.join(os.path.dirname(path), "cli_gptq.safetensors")
    r = subprocess.run([sys.executable, "-m", "convert_to_quant", "-i", server.models("diffusion_models", MODEL),
                        "-o", cli_out, "--optimizer", "gptq", "--calibration-data", path, "--preset", "auto",
                        "--device", "cpu", "--verbose", "MINIMAL"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _saved_tensors(cli_out) == wired
    os.unlink(cli_out)
    # an existing name is not replaced without overwrite (refused before sampling); '..' never leaves the folder
    for name, message in ((CALIB_NAME, "already exists; turn on overwrite"), ("../evil", "contains '..'")):
        again = dict(prompt)
        again["30"] = _capture_node(["10", 0], name, seed=5)
        for k in ("2", "4"):
            again.pop(k)
        again["31"] = {"class_type": "PreviewAny", "inputs": {"source": ["30", 2]}}
        err = execution_error(server.run(again))
        assert err and err["node_type"] == "QuantCalibrationCapture" and message in err["exception_message"], err
    assert open(path, "rb").read() == before
    assert not os.path.exists(server.models("evil.safetensors"))


def _example(name):
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example_workflows", "api",
                           name + ".json")) as f:
        return json.load(f)


def _runnable(wf, model_name):
    """The example with what this test machine lacks swapped out, structure kept: the text encoder
    (CLIPLoader + CLIPTextEncode) becomes test conditioning, the VAE decode + video save a SaveLatent;
    model/LoRA files are the small generated ones, the latent 64x64x1 and 2 steps."""
    wf = json.loads(json.dumps(wf))
    prefix = None
    for nid, node in list(wf.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CLIPLoader" or ct == "VAELoader" or ct == "VAEDecode":
            del wf[nid]
        elif ct == "CLIPTextEncode":
            wf[nid] = {"class_type": "CTQTestConditioning", "inputs": {"seed": int(nid), "tokens": 8, "dim": 4096}}
        elif ct == "SaveAnimatedWEBP":
            prefix = "example_" + inp["filename_prefix"]
            sampler = next(k for k, v in wf.items() if v["class_type"] == "KSampler")
            wf[nid] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": f"latents/{prefix}"}}
        elif ct in ("UNETLoader", "QuantDiffusionModelLoader"):
            inp["unet_name"] = model_name if ct == "UNETLoader" else INT8
        elif ct == "LoraLoaderModelOnly":
            inp["lora_name"] = LORA
        elif ct == "EmptyHunyuanLatentVideo":
            inp.update(width=64, height=64, length=1)
        elif ct == "KSampler":
            inp["steps"] = 2
    return wf, prefix


@pytest.mark.parametrize("name", ["load_and_sample_with_lora", "quantize_on_the_fly"])
def test_example_workflow_runs(server, converted, name):
    wf, prefix = _runnable(_example(name), MODEL)
    ok(server.run(wf))
    out = _latent(server, prefix)
    assert out.shape == (1, 16, 1, 8, 8) and torch.isfinite(out).all()


def test_example_convert_and_save_runs(server):
    wf = _example("convert_and_save")
    wf["1"]["inputs"]["weights"] = f"diffusion_models/{MODEL}"
    wf["5"]["inputs"]["filename"] = "ctq/example_int8.safetensors"
    entry = ok(server.run(wf))
    assert os.path.isfile(server.models("diffusion_models", "ctq", "example_int8.safetensors"))
    assert ui_outputs(entry, "4")["images"]  # the SQNR chart IMAGE went to PreviewImage


def test_core_int8_convrot_file_from_comfy_kitchen_loads_and_samples(server):
    """A file quantized by comfy-kitchen (the library stock ComfyUI uses) in the core int8_tensorwise +
    convrot format, described only by the header's _quantization_metadata (no per-layer comfy_quant
    tensors), loads in our loader and samples close to the float model."""
    layout = pytest.importorskip("comfy_kitchen.tensor.int8").TensorWiseINT8Layout
    from convert_to_quant.quant_core.plan import PlanOptions, build_plan
    from convert_to_quant.quant_core.model_quant import tensor_infos
    sd = wan21_state_dict()
    plan = build_plan(tensor_infos(sd), PlanOptions(presets=("auto",)))
    out, layers = {}, {}
    for key, t in sd.items():
        lp = plan.layer_for_key(key)
        if lp is None or lp.spec is None:
            out[key] = t
            continue
        q, params = layout.quantize(t, is_weight=True, per_channel=True, convrot=True, convrot_groupsize=256)
        out[key], out[lp.base + ".weight_scale"] = q, params.scale.float()
        layers[lp.base] = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 256}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_tensors(server.models("diffusion_models", "ctq", "wan_core_convrot.safetensors"), out, metadata=meta)
    prompt = {"10": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
              "20": {"class_type": "QuantDiffusionModelLoader",
                     "inputs": {"unet_name": "ctq/wan_core_convrot.safetensors", "compute_dtype": "default"}}}
    prompt.update(sample_nodes(["10", 0], "core_ref", start=100))
    prompt.update(sample_nodes(["20", 0], "core_int8", start=200))
    ok(server.run(prompt))
    assert len(layers) == 20
    assert rel_err(_latent(server, "core_int8"), _latent(server, "core_ref")) < 0.05


# ------------------------------------------------------------------------------------------------
# issue 15: two copies of the pack; GPTQ without calibration says so
# ------------------------------------------------------------------------------------------------
def test_gptq_without_calibration_says_weight_only(server):
    entry = ok(server.run(convert_prompt("ctq/gptq_weight_only.safetensors", optimizer="gptq")))
    text = ui_outputs(entry, "3")["text"][0]
    assert "gptq ran without calibration data" in text and "weight-only" in text, text
    assert "gptq ran without calibration data" in server.log_tail(400)


def test_two_copies_of_the_pack_still_start(tmp_path):
    """A second copy (a zip download next to a clone, a renamed folder) used to register
    /convert_to_quant/inspect again: aiohttp refused it and the whole server failed to start."""
    from comfy_helpers import REPO
    base = str(tmp_path)
    save_tensors(os.path.join(base, "models", "diffusion_models", MODEL), wan21_state_dict())
    os.makedirs(os.path.join(base, "custom_nodes"))
    copy_dir = os.path.join(base, "custom_nodes", "convert_to_quant-main")
    os.symlink(REPO, copy_dir)
    srv = ComfyServer(base)
    try:
        info = srv.get("/object_info")
        assert all(n in info for n in OUR_NODES)
        status, body = srv.request("GET", f"/convert_to_quant/inspect?weights=diffusion_models/{MODEL}")
        assert status == 200 and body["family"] == "wan", body
        log = srv.log_tail(400)
        warnings = [line for line in log.splitlines() if "is already served by" in line]
        assert len(warnings) == 1, log
        m = re.search(r"is already served by (\S+); this copy in (\S+) does not", warnings[0])
        assert m, warnings[0]
        nodes_dir = os.path.join(base, "custom_nodes")
        assert {m.group(1), m.group(2)} == {os.path.join(nodes_dir, "convert_to_quant"), copy_dir}, warnings[0]
        assert "Added route will never be executed" not in log
    finally:
        srv.stop()


@pytest.mark.parametrize("quant, message", [
    ({"format": "int8_quip", "optimizer": "gptq"}, "use optimizer quip (or rtn), not gptq"),
    ({"format": "int8_smoothquant"}, "int8_smoothquant needs calibration statistics"),
])
def test_formats_that_need_their_optimizer_or_calibration_are_refused(server, quant, message):
    entry = server.run(convert_prompt("ctq/never_fmt.safetensors", **quant))
    err = execution_error(entry)
    assert err["node_type"] == "QuantQuantize" and message in err["exception_message"], err
    assert not os.path.exists(server.models("diffusion_models", "ctq", "never_fmt.safetensors"))
