"""convert_to_quant: a ComfyUI custom node pack and a Python package.

Imported by ComfyUI (as a custom node directory) it registers the nodes and the web extension; imported
anywhere else (``import convert_to_quant``) it only exposes the library, without touching ComfyUI.
"""
__version__ = "1.0.0"

WEB_DIRECTORY = "./web"
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}


def _comfy_available() -> bool:
    try:
        import comfy.utils  # noqa: F401
        import folder_paths  # noqa: F401
    except Exception:
        return False
    return True


if _comfy_available():
    # inside ComfyUI: a failure to import the nodes is a real error and must show, not be swallowed
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401,F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
