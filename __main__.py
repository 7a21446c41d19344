"""``python -m convert_to_quant ...`` (also what torchrun launches for multi-GPU conversion)."""
import sys

from .quant_core.launcher import console_main

sys.exit(console_main())
