"""Quality per step: every sampler on the built-in model, scored by the compositional benchmark at 4, 8, 16, 32 steps.

Prints one JSON object (every cell: accuracy per metric, NFE per image, seconds) and a markdown table of all-correct
accuracy with seconds per image, for choosing the README's recommended defaults. A benchmark, not a test.

    python benchmarks/samplers.py                                     # the full table (long on a CPU)
    python benchmarks/samplers.py --n 1 --steps 4 --samplers euler    # smoke
CFG++ samplers take cfg / 12.5 as their lambda (A1111's mapping of a CFG scale onto CFG++'s 0..1 range).
"""

from __future__ import annotations

import argparse
import sys
import time

import chromaflow
from chromaflow.benchmark import emit
from chromaflow.engine import sampling
from chromaflow.engine.evaluate import METRICS
from chromaflow.pipeline.training import evaluate_pipeline


def distinct_samplers() -> list[str]:
    """One name per sampler function (ddim is euler)."""
    seen, names = set(), []
    for name, fn in sampling.SAMPLERS.items():
        if fn not in seen:
            seen.add(fn)
            names.append(name)
    return names


def count_nfe(pipe, **settings) -> int:
    """Transformer calls for one image (a cond + uncond batch counts once)."""
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        pipe("a red circle", seed=0, progress=False, **settings)
    finally:
        handle.remove()
    return len(calls)


def run(model: str, samplers: list[str], steps_list: list[int], n: int, seed: int, scheduler: str | None,
        cfg: float | None) -> dict:
    pipe = chromaflow.load(model)
    cfg = pipe.defaults.cfg if cfg is None else cfg
    cells = []
    for name in samplers:
        settings = dict(sampler=name, cfg=cfg / 12.5 if sampling.SAMPLERS[name].needs_uncond else cfg)
        if scheduler:
            settings["scheduler"] = scheduler
        for steps in steps_list:
            start = time.perf_counter()
            report = evaluate_pipeline(pipe, n_per_category=n, seed=seed, steps=steps, **settings)
            seconds = time.perf_counter() - start
            cells.append({"sampler": name, "steps": steps, "cfg": settings["cfg"],
                          "nfe": count_nfe(pipe, steps=steps, **settings), "images": report["overall"]["n"],
                          "seconds": round(seconds, 2), "seconds_per_image": round(seconds / report["overall"]["n"], 3),
                          "accuracy": {m: report["overall"][m] for m in METRICS}})
            cell = cells[-1]  # progress, so a run cut short still shows what it measured
            print(f"... {name} {steps} steps: all-correct {100 * cell['accuracy']['all_correct']:.1f}%, "
                  f"{cell['seconds_per_image']:.2f} s/image", file=sys.stderr, flush=True)
    return {"model": pipe.name, "n_per_category": n, "seed": seed, "scheduler": scheduler or pipe.defaults.scheduler,
            "cells": cells}


def markdown(result: dict) -> str:
    steps_list = sorted({c["steps"] for c in result["cells"]})
    lines = [f"all-correct accuracy % (seconds per image), {result['model']}, scheduler {result['scheduler']}, "
             f"{result['n_per_category']} prompts per category and language", "",
             "| sampler | NFE/step | " + " | ".join(f"{s} steps" for s in steps_list) + " |",
             "|---|---:|" + "---:|" * len(steps_list)]
    for name in dict.fromkeys(c["sampler"] for c in result["cells"]):
        row = {c["steps"]: c for c in result["cells"] if c["sampler"] == name}
        cells = [f"{100 * row[s]['accuracy']['all_correct']:.1f} ({row[s]['seconds_per_image']:.2f})" if s in row
                 else "-" for s in steps_list]
        lines.append(f"| {name} | {sampling.SAMPLERS[name].nfe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="built-in name or model folder (default: the built-in model)")
    ap.add_argument("--samplers", nargs="+", default=distinct_samplers(), help="default: every sampler")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--n", type=int, default=10, help="prompts per category and language")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheduler", help="default: the model's")
    ap.add_argument("--cfg", type=float, help="default: the model's")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    names = [sampling.resolve_sampler(s)[0] for s in args.samplers]
    result = run(args.model, names, args.steps, args.n, args.seed, args.scheduler, args.cfg)
    emit(result, markdown(result), args.out)


if __name__ == "__main__":
    main()
