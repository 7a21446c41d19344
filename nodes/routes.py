"""Server route for the web extension: what the Load Weights node shows when a file is picked.

``GET /convert_to_quant/inspect?weights=<folder>/<file>`` -> JSON from ``conversion.inspect_weights``
(header only; the file must be one of ComfyUI's listed files, so the route cannot read arbitrary paths).
"""
from __future__ import annotations

import logging
import os
import sys

from aiohttp import web

from ..quant_core.errors import ConvertError
from .conversion import describe_inspection, inspect_weights, resolve_choice

log = logging.getLogger("convert_to_quant")
ROUTE = "/convert_to_quant/inspect"


async def inspect(request: web.Request) -> web.Response:
    choice = request.query.get("weights", "")
    try:
        info = inspect_weights(resolve_choice(choice))
    except ConvertError as e:
        return web.json_response({"error": str(e)}, status=400)
    info["text"] = describe_inspection(info)
    return web.json_response(info)


PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _owner(handler) -> str:
    """The folder of the pack whose code handles a route (for the duplicate-copy warning)."""
    code = getattr(handler, "__code__", None)
    path = getattr(code, "co_filename", None) or getattr(handler, "__module__", None) or repr(handler)
    d = os.path.dirname(os.path.abspath(path)) if os.path.sep in str(path) else str(path)
    return os.path.dirname(d) if os.path.basename(d) == "nodes" else d


def _existing_handler(instance, method: str, path: str):
    """The handler already registered for ``method path`` on the server (its route table, which ComfyUI
    adds to the app at start-up, or the app's router itself), else ``None``."""
    for r in getattr(instance, "routes", None) or ():
        if getattr(r, "method", None) == method and getattr(r, "path", None) == path:
            return r.handler
    router = getattr(getattr(instance, "app", None), "router", None)
    for r in (router.routes() if router is not None else ()):
        info = r.resource.get_info() if getattr(r, "resource", None) is not None else {}
        if r.method == method and path in (info.get("path"), info.get("formatter")):
            return r.handler
    return None


def register_routes():
    """Add the route to ComfyUI's server. A second copy of the pack (a zip download next to a clone, a
    renamed folder) must not add it again: aiohttp refuses a duplicate route and ComfyUI then fails to
    start at all. The first copy keeps the route; one warning names both folders."""
    # only when ComfyUI's server is running (main.py imports it before custom nodes); importing server
    # here would start pulling the whole web app into tools and tests
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    existing = _existing_handler(instance, "GET", ROUTE)
    if existing is not None:
        log.warning("convert_to_quant: %s is already served by %s; this copy in %s does not register it "
                    "again. Two copies of convert_to_quant are installed: remove one of them.",
                    ROUTE, _owner(existing), PACK_DIR)
        return False
    instance.routes.get(ROUTE)(inspect)
    return True
