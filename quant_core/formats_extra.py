"""The SmoothQuant and QuIP formats, now ``formats/int8_smoothquant.py`` and ``formats/int8_quip.py``;
this module keeps the old import path working."""
from .formats.int8_quip import (QUIP_MAX_BLOCK, Int8QuIP, quip_block_size, quip_linear,  # noqa: F401
                                random_signs, sylvester_transform)
from .formats.int8_smoothquant import Int8SmoothQuant, smoothquant_linear  # noqa: F401
