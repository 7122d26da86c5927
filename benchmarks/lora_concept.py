"""Does a LoRA teach a concept the base model never saw? Train one on a new shape or colour; measure before / after.

The built-in model knows four shapes (circle, square, triangle, star) in six colours; two concepts are new to it:
- `charcoal`: a near-black colour no object ever had. The VAE can decode it (black appeared as a background); a
  palette outsider such as pink decodes as purple, so no adapter on the transformer could draw that. The word is
  "charcoal", not "black": the frozen byte-level text encoder reads "a black star" almost as "a blue star" (pooled
  cosine 0.75), so a transformer-only LoRA cannot tell them apart, while "charcoal" is unlike every colour it knows;
- `cross`: a plus-shaped fifth shape that never appeared in a caption or an image.
This script (one command) renders the concept in the known shapes or colours with English captions, mixes it 1:1
with ordinary shapes-world batches (so the model keeps what it knew), trains a LoRA on the frozen built-in model with
the regular trainer (`TrainConfig.lora`), and measures on held-out prompts ("a charcoal star", "a small red cross on a
white background", ...) how often the largest object shows the concept (its colour nearest to the named one, or its
best-fitting shape template the named shape), and with the other attribute right too, before and after. The
ordinary compositional benchmark (all-correct) shows whether anything was forgotten. Prints JSON and a markdown table.

    python benchmarks/lora_concept.py                    # charcoal objects on the built-in model (minutes)
    python benchmarks/lora_concept.py --concept cross    # the new shape
    python benchmarks/lora_concept.py --quick            # tiny random base, 4 steps: the whole pipeline in seconds
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import chromaflow
from chromaflow.benchmark import emit
from chromaflow.engine import shapes
from chromaflow.engine.evaluate import background_rgb
from chromaflow.engine.train import ShapesData, TrainConfig, train
from chromaflow.pipeline.training import evaluate_pipeline

NEW_SHAPES = ("cross",)
NEW_COLOURS = {"charcoal": (40, 40, 40)}
CONCEPTS = (*NEW_COLOURS, *NEW_SHAPES)
ALL_SHAPES = (*shapes.SHAPES, *NEW_SHAPES)
ALL_COLOURS = {**shapes.COLORS, **NEW_COLOURS}
ARM = 1 / 3  # arm width / side: the cross fills the middle row and column of its bbox's 3x3 grid
TRAIN_TEMPLATES = ["a {c} {s}", "a picture of a {c} {s}", "an image of a {z} {c} {s}", "a simple drawing of a {c} {s}",
                   "there is a {c} {s} in the picture", "a {z} {c} {s}"]
EVAL_TEMPLATES = ["a {c} {s}", "a {z} {c} {s}", "a rendering that shows a {c} {s}"]  # the last one never trained


def caption(template: str, shape: str, colour: str, size: str, rng: np.random.Generator) -> str:
    words = {"small": ("small", "little"), "large": ("large", "big")}[size]
    text = template.format(c=colour, s=shape, z=words[int(rng.integers(2))])
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def draw_cross(draw: ImageDraw.ImageDraw, box, fill) -> None:
    """A plus filling pixel-space `box`: its middle row and column of the 3x3 grid over the box."""
    x0, y0, x1, y1 = box
    w, h = (x1 - x0) * ARM, (y1 - y0) * ARM
    draw.rectangle([x0, y0 + h, x1, y1 - h], fill=fill)
    draw.rectangle([x0 + w, y0, x1 - w, y1], fill=fill)


def draw_any(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    """shapes.draw_shape, plus the new shape."""
    if shape == "cross":
        draw_cross(draw, box, fill)
    else:
        shapes.draw_shape(draw, shape, box, fill)


def render_concept(shape: str, colour: str, size: str, background: str, pixels: int, rng: np.random.Generator
                   ) -> Image.Image:
    """One object of any shape and colour, laid out (a cross in a square's bbox) and anti-aliased exactly like the
    shapes world renders its own."""
    scene = shapes.place(rng, [(shape if shape in shapes.SHAPES else "square", "red", size)], background=background)
    big = pixels * shapes.SUPERSAMPLE
    image = Image.new("RGB", (big, big), shapes.BACKGROUNDS[background])
    draw_any(ImageDraw.Draw(image), shape, [v * big for v in scene.objects[0].bbox], ALL_COLOURS[colour])
    return image.reduce(shapes.SUPERSAMPLE)


def concept_object(concept: str, i: int) -> tuple[str, str]:
    """(shape, colour) number i of the concept: the new attribute with the known ones of the other kind in turn."""
    if concept in NEW_COLOURS:
        return shapes.SHAPES[i % len(shapes.SHAPES)], concept
    return concept, list(shapes.COLORS)[i % len(shapes.COLORS)]


def backgrounds(concept: str) -> tuple[str, ...]:
    """Plain backgrounds the concept shows on (a charcoal object on black would be invisible)."""
    return ("white", "gray") if concept in NEW_COLOURS else ("white", "black", "gray")


class ConceptData:
    """Training batches: even items show the concept with English captions, odd items are ordinary shapes-world
    ones."""

    def __init__(self, concept: str, seed: int = 0):
        self.concept, self.seed, self.world = concept, seed, ShapesData(seed=seed + 1)

    def batch(self, number: int, batch_size: int, size: int):
        images, captions = [], []
        ordinary_images, ordinary = self.world.batch(number, batch_size, size)
        for i in range(batch_size):
            if i % 2:
                images.append(ordinary_images[i])
                captions.append(ordinary[i])
                continue
            rng = np.random.default_rng([self.seed, number, i])
            shape, colour = concept_object(self.concept, int(rng.integers(1 << 16)))
            size_name = ("small", "large")[int(rng.integers(2))]
            others = backgrounds(self.concept)
            background = "default" if rng.random() < 0.75 else others[int(rng.integers(len(others)))]
            images.append(shapes.to_tensor(render_concept(shape, colour, size_name, background, size, rng)))
            template = TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))]
            captions.append(caption(template, shape, colour, size_name, rng))
        return torch.stack(images), captions


def eval_prompts(concept: str, n: int, seed: int = 1234) -> list[tuple[str, str, str]]:
    """n held-out (prompt, shape, colour) for the concept."""
    rng = np.random.default_rng([seed, 99])
    prompts = []
    for i in range(n):
        shape, colour = concept_object(concept, i)
        size = ("small", "large")[int(rng.integers(2))]
        text = caption(EVAL_TEMPLATES[int(rng.integers(len(EVAL_TEMPLATES)))], shape, colour, size, rng)
        if rng.random() < 0.25:
            others = backgrounds(concept)
            text += f" on a {others[int(rng.integers(len(others)))]} background"
        prompts.append((text, shape, colour))
    return prompts


def largest_object(image: Image.Image) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask cropped to its bbox, mean colour) of the largest connected foreground region; None when nothing shows."""
    from scipy import ndimage
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    foreground = np.linalg.norm(a - background_rgb(a), axis=-1) > 60
    labels, n = ndimage.label(foreground)
    if n == 0:
        return None
    biggest = 1 + int(np.argmax(ndimage.sum(foreground, labels, range(1, n + 1))))
    mask = labels == biggest
    if mask.mean() < 0.002:
        return None
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], a[mask].mean(0)


def template(shape: str, h: int, w: int) -> np.ndarray:
    """Coverage (h, w) of `shape` stretched over an h x w bbox, anti-aliased like the renderer."""
    return shapes.coverage(shape, (0, 0, w, h), (h, w), draw=draw_any)


def nearest_shape(mask: np.ndarray) -> str:
    """The shape (the world's four or the new one) whose template over the mask's bbox overlaps it best (IoU). A
    blobby cross still wins over a square (its empty corners) and a circle (its straight arms)."""
    h, w = mask.shape
    if min(h, w) < 6:
        return "none"
    m = mask.astype(np.float32)
    iou = {s: float(np.minimum(m, t).sum() / np.maximum(m, t).sum()) for s in ALL_SHAPES for t in [template(s, h, w)]}
    return max(iou, key=iou.get)


def nearest_colour(rgb: np.ndarray) -> str:
    return min(ALL_COLOURS, key=lambda name: float(np.sum((np.array(ALL_COLOURS[name]) - rgb) ** 2)))


def concept_accuracy(pipe, concept: str, prompts: list[tuple[str, str, str]], seed: int, batch: int = 8) -> dict:
    """Shares of images whose largest object shows the concept, and shows it with the other attribute right."""
    found = []
    for start in range(0, len(prompts), batch):
        images = pipe([p for p, _, _ in prompts[start:start + batch]], seed=seed + start, progress=False).images
        found += [largest_object(im) for im in images]
    read = [None if f is None else (nearest_shape(f[0]), nearest_colour(f[1])) for f in found]
    hit = [r is not None and concept in r for r in read]
    both = [r == (shape, colour) for r, (_, shape, colour) in zip(read, prompts)]
    return {"concept": sum(hit) / len(prompts), "both": sum(both) / len(prompts),
            "object_found": sum(f is not None for f in found) / len(prompts)}


def quick_base(folder: Path) -> str:
    """A tiny random model folder (for the smoke run)."""
    from chromaflow.pipeline.loading import random_pipeline, save_folder
    return str(save_folder(random_pipeline("tiny"), folder / "base"))


def run(args, folder: Path, log) -> dict:
    base = quick_base(folder) if args.quick else args.base
    base_pipe = chromaflow.load("default" if base == "builtin" else base)
    prompts = eval_prompts(args.concept, args.n)
    log(f"before: {len(prompts)} '{args.concept}' prompts")
    before = concept_accuracy(base_pipe, args.concept, prompts, args.seed)
    general_before = evaluate_pipeline(base_pipe, args.general_n, seed=args.seed)["overall"]
    d = base_pipe.defaults
    cfg = TrainConfig(name=f"{args.concept}-lora", base=base, lora={"rank": args.rank, "alpha": args.alpha},
                      stages=[{"steps": args.steps, "size": args.sizes, "batch_size": args.batch}], lr=args.lr,
                      warmup_steps=max(1, args.steps // 10), lr_schedule="constant", ema_decay=0.0,
                      checkpoint_every=max(1, args.steps), log_every=max(1, args.steps // 20), seed=args.seed,
                      defaults={"width": d.width, "height": d.height, "steps": d.steps, "cfg": d.cfg})
    log(f"training a rank-{args.rank} LoRA for {args.steps} steps")
    start = time.time()
    train(cfg, folder / "run", resume=False, progress=not args.quiet, data=ConceptData(args.concept, args.seed))
    train_s = time.time() - start
    lora = folder / "run" / f"{cfg.name}-lora.safetensors"
    pipe = chromaflow.load("default" if base == "builtin" else base, loras=[(lora, 1.0)])
    log("after")
    after = concept_accuracy(pipe, args.concept, prompts, args.seed)
    general_after = evaluate_pipeline(pipe, args.general_n, seed=args.seed)["overall"]
    return {"benchmark": "lora_concept", "concept": args.concept, "base": base, "steps": args.steps, "rank": args.rank,
            "train_s": train_s, "prompts": len(prompts), "lora_file": str(lora), "lora_bytes": lora.stat().st_size,
            "before": before, "after": after, "general_all_correct": {"before": general_before.get("all_correct"),
                                                                     "after": general_after.get("all_correct")},
            "date": time.strftime("%Y-%m-%d")}


def table(r: dict) -> str:
    g = {k: "-" if v is None else f"{v:.0%}" for k, v in r["general_all_correct"].items()}
    other = "shape" if r["concept"] in NEW_COLOURS else "colour"
    return "\n".join([
        f"LoRA rank {r['rank']}, {r['steps']} steps ({r['train_s'] / 60:.1f} min), on `{r['base']}`; "
        f"{r['prompts']} held-out '{r['concept']}' prompts.", "",
        f"| | largest object shows '{r['concept']}' | ... with the named {other} too | object found "
        "| general all-correct |",
        "|---|---|---|---|---|",
        *(f"| {name} | {r[k]['concept']:.0%} | {r[k]['both']:.0%} | {r[k]['object_found']:.0%} | {g[k]} |"
          for name, k in (("base", "before"), ("base + LoRA", "after")))])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concept", default="charcoal", choices=CONCEPTS,
                    help="what to teach: charcoal (a new object colour) or cross (a new shape)")
    ap.add_argument("--base", default="builtin", help="model folder to adapt (default: the built-in model)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 128, 128, 256], help="px, cycled step by step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n", type=int, default=48, help="held-out concept prompts")
    ap.add_argument("--general-n", type=int, default=10, help="compositional benchmark prompts per category")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="folder for the run and the LoRA files (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="tiny random base, 4 steps: the whole pipeline in seconds")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.sizes, args.n, args.general_n = 4, 4, [32, 64], 4, 1
    log = lambda s: print(f"... {s}", file=sys.stderr)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        report = run(args, folder, log)
    emit(report, table(report), args.out)


if __name__ == "__main__":
    main()
