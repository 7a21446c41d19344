"""Errors the library raises for expected problems.

Everything a user can cause (bad file, bad flag, bad path) raises a ``ConvertError`` subclass with a
message that names the problem and where it is; the CLI prints it without a traceback and exits
non-zero, the nodes show it as a ComfyUI error. Anything else is a bug and keeps its traceback.
"""


class ConvertError(Exception):
    """Base class of all expected, user-facing errors."""


class SafetensorsFormatError(ConvertError):
    """The input is not a valid safetensors file (header, offsets, dtypes...)."""


class UnsupportedInputError(ConvertError):
    """The input is of a kind we refuse to read (pickle checkpoints, ...)."""


class BadWeightsError(ConvertError):
    """Weights we cannot quantize (NaN/Inf values, wrong shapes...)."""


class PlanError(ConvertError):
    """Invalid options, presets, layer-config or format parameters."""


class OutputPathError(ConvertError):
    """The output path is not acceptable (same as input, escapes its folder, exists...)."""


class OutputBusyError(OutputPathError):
    """Another live process (or another writer in this one) is writing the same output right now."""


class LoRAError(ConvertError):
    """A LoRA file that does not fit the model."""


class CalibrationError(ConvertError):
    """Calibration statistics that are missing, corrupt or do not fit the model."""


class ConversionCancelled(ConvertError):
    """The user cancelled the conversion (Ctrl-C, SIGTERM, ComfyUI /interrupt)."""
