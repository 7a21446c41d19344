"""convert_to_quant's conversion library (plain torch; never imports ComfyUI).

The names most callers need; see docs/API.md."""
from .errors import ConvertError  # noqa: F401
from .formats import FORMATS, FormatSpec, QuantizedWeight, get_format, make_spec, register_format  # noqa: F401
from .optimizers import OPTIMIZERS, get_optimizer, register_optimizer  # noqa: F401
from .pipeline import ConversionJob, ConvertOptions, convert_file  # noqa: F401
from .plan import PlanOptions, build_plan  # noqa: F401
from .presets import all_presets, detect_family  # noqa: F401
