"""Server route for the web extension: what the Load Weights node shows when a file is picked.

``GET /convert_to_quant/inspect?weights=<folder>/<file>`` -> JSON from ``conversion.inspect_weights``
(header only; the file must be one of ComfyUI's listed files, so the route cannot read arbitrary paths).
"""
from __future__ import annotations

import logging

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
    from server import PromptServer
    instance = getattr(PromptServer, "instance", None)
    if instance is None:  # imported outside a running server (tools, tests)
        return False
    instance.routes.get(ROUTE)(inspect)
    return True
