"""Errors the library raises for expected problems.

Everything a user can cause (bad file, bad flag, bad path) raises a ``ConvertError`` subclass with a
message that names the problem and where it is; the CLI prints it without a traceback and exits
non-zero, the nodes show it as a ComfyUI error. Anything else is a bug and keeps its traceback.
"""
import re


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


# The Python API's spelling of an option in messages -> the command line's (the CLI prints errors and
# warnings through ``cli_spelling``); library code names parameters, never flags.
CLI_SPELLING = {
    "overwrite=True": "--overwrite",
    "nan_policy='keep'": "--nan-policy keep",
    "bias_correction": "--bias-correction",
    "smoothquant": "--smoothquant",
    "calibration_data": "--calibration-data",
    "input_scale": "--input_scale",
}
_CLI_RX = re.compile("|".join(r"(?<![\w.-])" + re.escape(k) + r"(?![\w])" for k in CLI_SPELLING))


def cli_spelling(msg: str) -> str:
    """A library message as the command line says it: parameter names become flags."""
    return _CLI_RX.sub(lambda m: CLI_SPELLING[m.group(0)], msg)


def display_name(name) -> str:
    """A name from a file (tensor key, layer, metadata value) as it may appear in a message or on a
    terminal: unchanged when it is plain printable text, else its ``repr`` -- quoted, with newlines,
    escape sequences (ESC), other control and format characters and lone surrogates written as
    ``\\n``, ``\\x1b``, ``\\u202e``, ``\\ud800``. A key cannot forge a second ``error:`` line, recolour
    the terminal or make printing fail with UnicodeEncodeError. Every message and printed table that
    shows a name from a file goes through this (or ``{name!r}``, which escapes the same way)."""
    s = name if isinstance(name, str) else str(name)
    return s if s.isprintable() else repr(s)


def terminal_text(text: str) -> str:
    """``text`` made safe to print: line breaks and tabs kept, every other control or format character
    and every lone surrogate escaped (``\\x1b``, ``\\ud800``). The last line of defence where messages
    are printed (CLI), behind ``display_name`` at the source."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch in "\n\t" or ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)
