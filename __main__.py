"""``python -m convert_to_quant ...`` (also what torchrun launches for multi-GPU conversion)."""
from .quant_core.launcher import entry_point

entry_point()
