"""Training reports drawn with PIL alone: the loss curve of a run's metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def loss_curve(metrics_path: str | Path, out_path: str | Path, size=(640, 360), smooth: int = 20) -> Path:
    """Loss vs step on a log axis, raw points in grey and a running mean over `smooth` points in blue."""
    rows = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    points = [(r["step"], r["loss"]) for r in rows if r.get("loss", 0) > 0]
    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    left, right, top, bottom = 60, w - 15, 15, h - 35
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    if len(points) >= 2:
        steps = [s for s, _ in points]
        logs = [math.log10(v) for _, v in points]
        lo, hi = min(logs), max(logs)
        hi = hi if hi > lo else lo + 1
        sx = lambda s: left + (right - left) * (s - steps[0]) / max(1, steps[-1] - steps[0])
        sy = lambda v: bottom - (bottom - top) * (v - lo) / (hi - lo)
        draw.line([(sx(s), sy(v)) for s, v in zip(steps, logs)], fill=(190, 190, 190))
        means = [sum(logs[max(0, i - smooth + 1):i + 1]) / len(logs[max(0, i - smooth + 1):i + 1])
                 for i in range(len(logs))]
        draw.line([(sx(s), sy(v)) for s, v in zip(steps, means)], fill=(40, 80, 200), width=2)
        for frac in (0, 0.5, 1):
            v = lo + frac * (hi - lo)
            draw.text((4, sy(v) - 6), f"{10 ** v:.3g}", fill=(0, 0, 0), font=font)
        draw.text((left, bottom + 8), f"step {steps[0]}", fill=(0, 0, 0), font=font)
        draw.text((right - 70, bottom + 8), f"step {steps[-1]}", fill=(0, 0, 0), font=font)
    draw.text((left + 5, top + 3), "training loss (log scale)", fill=(0, 0, 0), font=font)
    img.save(out_path)
    return Path(out_path)
