"""``python -m convert_to_quant ...`` (also what torchrun launches for multi-GPU conversion)."""
import sys

from .quant_core.cli import main

sys.exit(main())
