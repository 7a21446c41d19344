"""The per-layer SQNR bar chart returned by the Quality Report node as a ComfyUI IMAGE.

Drawn with Pillow (always present in ComfyUI): one bar per quantized layer in file order, height =
weight SQNR in dB, red below the report's threshold; a dashed line marks the threshold.
"""
from __future__ import annotations

import math

from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

BG = (24, 24, 28)
AXIS = (150, 150, 160)
GOOD = (80, 170, 255)
BAD = (235, 80, 80)
TEXT = (220, 220, 225)


def sqnr_bars(report) -> List[Tuple[str, float]]:
    """(layer, SQNR dB) of every quantized layer with a finite SQNR, in file order."""
    return [(name, float(l.sqnr_db)) for name, l in report.layers.items()
            if l.quantized and l.sqnr_db is not None and math.isfinite(l.sqnr_db)]


def render_sqnr_chart(bars: List[Tuple[str, float]], threshold: Optional[float], width: int = 1024,
                      height: int = 384) -> torch.Tensor:
    """IMAGE tensor [1, height, width, 3] in [0, 1]."""
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 48, 12, 28, 24
    pw, ph = width - left - right, height - top - bottom
    vals = [v for _, v in bars]
    vmax = max(vals + [threshold or 0.0, 10.0])
    vmax = 10.0 * int(vmax / 10.0 + 1)
    d.text((left, 6), f"weight SQNR per layer (dB), {len(bars)} layers", fill=TEXT)
    for tick in range(0, int(vmax) + 1, 10):
        y = top + ph - ph * tick / vmax
        d.line([(left - 4, y), (left + pw, y)], fill=(50, 50, 58))
        d.text((4, y - 6), f"{tick:>3}", fill=AXIS)
    d.line([(left, top), (left, top + ph)], fill=AXIS)
    d.line([(left, top + ph), (left + pw, top + ph)], fill=AXIS)
    n = max(len(bars), 1)
    step = pw / n
    for i, (_, v) in enumerate(bars):
        x0 = left + i * step
        x1 = max(x0 + 1, left + (i + 1) * step - (1 if step > 3 else 0))
        y = top + ph - ph * max(v, 0.0) / vmax
        color = BAD if threshold is not None and v < threshold else GOOD
        d.rectangle([x0, y, x1, top + ph], fill=color)
    if threshold is not None:
        y = top + ph - ph * threshold / vmax
        for x in range(left, left + pw, 8):
            d.line([(x, y), (min(x + 4, left + pw), y)], fill=BAD)
        d.text((left + pw - 110, y - 14), f"threshold {threshold:g} dB", fill=BAD)
    if not bars:
        d.text((left + 10, top + ph // 2), "no quantized layers", fill=TEXT)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
