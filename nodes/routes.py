"""Server route for the web extension: what the Load Weights node shows when a file is picked.

``GET /convert_to_quant/inspect?weights=<folder>/<file>`` -> JSON from ``conversion.inspect_weights``
(header only; the file must be one of ComfyUI's listed files, so the route cannot read arbitrary paths).
"""
from __future__ import annotations

import logging
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


def register_routes():
    # only when ComfyUI's server is running (main.py imports it before custom nodes); importing server
    # here would start pulling the whole web app into tools and tests
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.get(ROUTE)(inspect)
    return True
