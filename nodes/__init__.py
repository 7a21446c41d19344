"""ComfyUI nodes (imported only when ComfyUI is; see the package ``__init__``).

Thin glue: conversion nodes over ``quant_core.pipeline``, runtime nodes over ``ops`` / ``patcher`` /
``kernels``. Node names start with ``Quant`` so they are easy to find in the node search.
"""
import folder_paths

from .conversion import NODES as _CONVERSION
from .handles import register_calibration_folder, remove_stale_temp_files
from .routes import register_routes
from .runtime import NODES as _RUNTIME

_ALL = {**_CONVERSION, **_RUNTIME}
NODE_CLASS_MAPPINGS = {name: cls for name, (cls, _) in _ALL.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: title for name, (_, title) in _ALL.items()}

register_calibration_folder()  # models/calibration: named calibration files (Capture writes, Quantize lists)
remove_stale_temp_files(folder_paths.get_output_directory())
register_routes()
