"""What flows between the conversion nodes, without holding a model in RAM.

* ``WeightsSource`` (type ``QUANT_WEIGHTS``): a file path plus the LoRAs to merge. Loading a 12B model
  file costs nothing here; Merge LoRA returns a new handle with one more LoRA.
* ``QuantizedFile`` (type ``QUANT_RESULT``): the converted model, streamed by Quantize (one layer in
  memory at a time, ``quant_core.pipeline.ConversionJob``) into a temporary file in a hidden folder of
  ComfyUI's output directory, plus its quality report. Save publishes it under the user's name by a hard
  link (or a copy when the destination is on another file system) and an atomic rename, so a 12B
  conversion never exists twice in RAM and Save never re-reads it into memory. The temporary file is
  deleted when ComfyUI drops the node output from its cache (or at exit); files left by a crashed
  process are removed the next time the node pack loads.
"""
from __future__ import annotations

import os
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

TMP_DIRNAME = ".convert_to_quant_tmp"


@dataclass(frozen=True)
class WeightsSource:
    path: str
    label: str  # "<folder>/<name>" as shown in the node
    family: Optional[str]
    loras: Tuple[Tuple[str, str, float], ...] = ()  # (label, path, strength)

    def with_lora(self, label: str, path: str, strength: float) -> "WeightsSource":
        return WeightsSource(self.path, self.label, self.family, self.loras + ((label, path, float(strength)),))

    def describe(self) -> str:
        s = self.label
        for label, _, strength in self.loras:
            s += f" + {label} x{strength:g}"
        return s


class QuantizedFile:
    """A finished conversion in a temporary file (deleted with this object)."""

    def __init__(self, tmp_path: str, source: WeightsSource, report, settings: Dict[str, Any],
                 lora_lines: Optional[List[str]] = None):
        self.tmp_path = tmp_path
        self.source = source
        self.report = report
        self.settings = settings
        self.lora_lines = lora_lines or []
        self._finalizer = weakref.finalize(self, _remove_quietly, tmp_path)

    @property
    def size(self) -> int:
        return os.path.getsize(self.tmp_path)

    def exists(self) -> bool:
        return os.path.isfile(self.tmp_path)

    def release(self):
        self._finalizer()


def _remove_quietly(path: str):
    for p in (path, path + ".partial"):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError:
            pass


_lock = threading.Lock()


def temp_dir(output_dir: str) -> str:
    d = os.path.join(output_dir, TMP_DIRNAME)
    with _lock:
        os.makedirs(d, exist_ok=True)
    return d


def new_temp_path(output_dir: str) -> str:
    return os.path.join(temp_dir(output_dir), f"{os.getpid()}-{uuid.uuid4().hex}.safetensors")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(output_dir: str) -> int:
    """Delete temporary conversions left by processes that no longer run. Returns how many."""
    d = os.path.join(output_dir, TMP_DIRNAME)
    if not os.path.isdir(d):
        return 0
    n = 0
    for name in os.listdir(d):
        pid_text = name.split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        try:
            os.unlink(os.path.join(d, name))
            n += 1
        except OSError:
            pass
    return n


@dataclass
class CalibrationStats:
    """Type ``QUANT_CALIBRATION``: a calibration statistics file captured from a sampling run. A
    temporary file is deleted with the object; a named one (``keep``: ``models/calibration/<name>``) stays."""
    path: str
    layers: int
    samples: int
    notes: List[str] = field(default_factory=list)
    keep: bool = False
    _finalizer: Any = None

    def __post_init__(self):
        if not self.keep:
            self._finalizer = weakref.finalize(self, _remove_quietly, self.path)


CALIBRATION_FOLDER = "calibration"


def register_calibration_folder() -> List[str]:
    """Make ``models/calibration`` a ComfyUI model folder (listed by ``folder_paths``, ``.safetensors``
    only). Tolerates an entry that already exists (extra_model_paths.yaml, a second copy of the pack):
    adds the default path and the extension to it. Returns the folder's paths."""
    import folder_paths
    default = os.path.join(folder_paths.models_dir, CALIBRATION_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(CALIBRATION_FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[CALIBRATION_FOLDER] = ([default], {".safetensors"})
    else:
        paths, exts = entry
        if default not in paths:
            folder_paths.add_model_folder_path(CALIBRATION_FOLDER, default)
        if isinstance(exts, set):
            exts.add(".safetensors")
    return folder_paths.get_folder_paths(CALIBRATION_FOLDER)
