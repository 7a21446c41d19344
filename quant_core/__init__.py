"""convert_to_quant's conversion library (plain torch; never imports ComfyUI).

The names most callers need; see docs/API.md. They load on first use (PEP 562), so that importing a
light submodule -- ``quant_core.launcher``, which starts multi-GPU ranks -- does not import torch."""
import importlib

_EXPORTS = {
    "ConvertError": ".errors",
    "FORMATS": ".formats", "FormatSpec": ".formats", "QuantizedWeight": ".formats", "get_format": ".formats",
    "make_spec": ".formats", "register_format": ".formats", "spec_from_choice": ".formats",
    "OPTIMIZERS": ".optimizers", "get_optimizer": ".optimizers", "register_optimizer": ".optimizers",
    "OptimizerOptions": ".optimizers",
    "ConversionJob": ".pipeline", "ConvertOptions": ".pipeline", "convert_file": ".pipeline",
    "PlanOptions": ".plan", "build_plan": ".plan",
    "all_presets": ".presets", "detect_family": ".presets",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(".pipeline", __name__)  # the whole library, every format and optimizer registered
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
