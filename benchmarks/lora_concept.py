"""Does a LoRA teach a concept the base model never saw? Train one on "pink" objects and measure before / after.

The built-in model was trained on six colours; pink is not among them, and "pink" never appeared in a caption.
This script (one command) renders pink shapes with English captions, mixes them 1:1 with ordinary shapes-world
batches (so the model keeps what it knew), trains a LoRA on the frozen built-in model with the regular trainer
(`TrainConfig.lora`), and measures on held-out prompts ("a pink star", "a small pink square on a black background",
...): how often the object's colour is pink rather than one of the known colours, before and after. The ordinary
compositional benchmark (all-correct) shows whether anything was forgotten. Prints JSON and a markdown table.

    python benchmarks/lora_concept.py                    # built-in model, 300 steps (minutes on 2 idle cores)
    python benchmarks/lora_concept.py --quick            # tiny random base, 4 steps: the pipeline end to end
"""

from __future__ import annotations

import argparse
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
from chromaflow.engine.train import ShapesData, TrainConfig, train
from chromaflow.pipeline.training import evaluate_pipeline

CONCEPT, RGB = "pink", (245, 120, 200)  # far from red (220, 50, 50), purple (150, 70, 190) and orange (245, 140, 40)
PALETTE = {**shapes.COLORS, CONCEPT: RGB}
TRAIN_TEMPLATES = ["a {c} {s}", "a picture of a {c} {s}", "an image of a {z} {c} {s}", "a simple drawing of a {c} {s}",
                   "there is a {c} {s} in the picture", "a {z} {c} {s}"]
EVAL_TEMPLATES = ["a {c} {s}", "a {z} {c} {s}", "a rendering that shows a {c} {s}"]  # the last one never trained


def caption(template: str, shape: str, size: str, rng: np.random.Generator) -> str:
    words = {"small": ("small", "little"), "large": ("large", "big")}[size]
    return template.format(c=CONCEPT, s=shape, z=words[int(rng.integers(2))])


def render_concept(shape: str, size: str, background: str, pixels: int, rng: np.random.Generator) -> Image.Image:
    """One pink object, laid out and anti-aliased exactly like the shapes world renders its colours."""
    scene = shapes.place(rng, [(shape, "red", size)], background=background)  # the colour does not affect layout
    big = pixels * shapes.SUPERSAMPLE
    image = Image.new("RGB", (big, big), shapes.BACKGROUNDS[background])
    shapes.draw_shape(ImageDraw.Draw(image), shape, [v * big for v in scene.objects[0].bbox], RGB)
    return image.reduce(shapes.SUPERSAMPLE)


class ConceptData:
    """Training batches: even items are pink objects with English captions, odd items ordinary shapes-world ones."""

    def __init__(self, seed: int = 0):
        self.seed, self.world = seed, ShapesData(seed=seed + 1)

    def batch(self, number: int, batch_size: int, size: int):
        images, captions = [], []
        ordinary_images, ordinary = self.world.batch(number, batch_size, size)
        for i in range(batch_size):
            if i % 2:
                images.append(ordinary_images[i])
                captions.append(ordinary[i])
                continue
            rng = np.random.default_rng([self.seed, number, i])
            shape, size_name = shapes.SHAPES[int(rng.integers(4))], ("small", "large")[int(rng.integers(2))]
            background = "default" if rng.random() < 0.75 else ("white", "black", "gray")[int(rng.integers(3))]
            image = render_concept(shape, size_name, background, size, rng)
            images.append(shapes.to_tensor(image))
            captions.append(caption(TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))], shape, size_name, rng))
        return torch.stack(images), captions


def eval_prompts(n: int, seed: int = 1234) -> list[str]:
    rng = np.random.default_rng([seed, 99])
    prompts = []
    for i in range(n):
        shape, size = shapes.SHAPES[i % 4], ("small", "large")[int(rng.integers(2))]
        text = caption(EVAL_TEMPLATES[int(rng.integers(len(EVAL_TEMPLATES)))], shape, size, rng)
        if rng.random() < 0.25:
            text += f" on a {('white', 'black', 'gray')[int(rng.integers(3))]} background"
        prompts.append(text)
    return prompts


def object_colour(image: Image.Image) -> str | None:
    """The palette colour (known six or pink) nearest to the mean of the pixels that differ from the border colour;
    None when no object is visible."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    w = max(1, a.shape[0] // 64)
    border = np.concatenate([a[:w].reshape(-1, 3), a[-w:].reshape(-1, 3), a[:, :w].reshape(-1, 3),
                             a[:, -w:].reshape(-1, 3)])
    background = np.median(border, 0)
    foreground = np.linalg.norm(a - background, axis=-1) > 60
    if foreground.mean() < 0.005:
        return None
    mean = a[foreground].mean(0)
    return min(PALETTE, key=lambda name: float(np.sum((np.array(PALETTE[name]) - mean) ** 2)))


def concept_accuracy(pipe, prompts: list[str], seed: int, batch: int = 8) -> dict:
    colours = []
    for start in range(0, len(prompts), batch):
        images = pipe(prompts[start:start + batch], seed=seed + start, progress=False).images
        colours += [object_colour(im) for im in images]
    counts = {name: colours.count(name) for name in [*PALETTE, None] if colours.count(name)}
    return {"pink": colours.count(CONCEPT) / len(colours), "object_found": sum(c is not None for c in colours) /
            len(colours), "colours": {str(k): v for k, v in counts.items()}}


def quick_base(folder: Path) -> str:
    """A tiny random model folder (for the smoke run)."""
    from chromaflow.pipeline.loading import random_pipeline, save_folder
    return str(save_folder(random_pipeline("tiny"), folder / "base"))


def run(args, folder: Path, log) -> dict:
    base = quick_base(folder) if args.quick else args.base
    base_pipe = chromaflow.load("default" if base == "builtin" else base)
    prompts = eval_prompts(args.n)
    log(f"before: {len(prompts)} concept prompts")
    before = concept_accuracy(base_pipe, prompts, args.seed)
    general_before = evaluate_pipeline(base_pipe, args.general_n, seed=args.seed)["overall"]
    d = base_pipe.defaults
    cfg = TrainConfig(name=f"{CONCEPT}-lora", base=base, lora={"rank": args.rank, "alpha": args.alpha},
                      stages=[{"steps": args.steps, "size": args.sizes, "batch_size": args.batch}], lr=args.lr,
                      warmup_steps=max(1, args.steps // 10), lr_schedule="constant", ema_decay=0.0,
                      checkpoint_every=max(1, args.steps), log_every=max(1, args.steps // 20), seed=args.seed,
                      defaults={"width": d.width, "height": d.height, "steps": d.steps, "cfg": d.cfg})
    log(f"training a rank-{args.rank} LoRA for {args.steps} steps")
    start = time.time()
    train(cfg, folder / "run", resume=False, progress=not args.quiet, data=ConceptData(args.seed))
    train_s = time.time() - start
    lora = folder / "run" / f"{cfg.name}-lora.safetensors"
    pipe = chromaflow.load("default" if base == "builtin" else base, loras=[(lora, 1.0)])
    log("after")
    after = concept_accuracy(pipe, prompts, args.seed)
    general_after = evaluate_pipeline(pipe, args.general_n, seed=args.seed)["overall"]
    return {"benchmark": "lora_concept", "concept": CONCEPT, "base": base, "steps": args.steps, "rank": args.rank,
            "train_s": train_s, "prompts": len(prompts), "lora_file": str(lora), "lora_bytes": lora.stat().st_size,
            "before": before, "after": after, "general_all_correct": {"before": general_before.get("all_correct"),
                                                                     "after": general_after.get("all_correct")},
            "date": time.strftime("%Y-%m-%d")}


def table(r: dict) -> str:
    g = {k: "-" if v is None else f"{v:.0%}" for k, v in r["general_all_correct"].items()}
    return "\n".join([
        f"LoRA rank {r['rank']}, {r['steps']} steps ({r['train_s'] / 60:.1f} min), on `{r['base']}`; "
        f"{r['prompts']} held-out '{r['concept']}' prompts.", "",
        f"| | {r['concept']} objects | object found | general all-correct |", "|---|---|---|---|",
        f"| base | {r['before']['pink']:.0%} | {r['before']['object_found']:.0%} | {g['before']} |",
        f"| base + LoRA | {r['after']['pink']:.0%} | {r['after']['object_found']:.0%} | {g['after']} |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="builtin", help="model folder to adapt (default: the built-in model)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 128, 128, 256], help="px, cycled step by step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
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
