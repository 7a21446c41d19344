"""convert_to_quant's conversion library (plain torch; never imports ComfyUI)."""
from .errors import ConvertError  # noqa: F401
from .formats import FORMATS, FormatSpec, QuantizedWeight, get_format, make_spec  # noqa: F401
