"""Step caching's trade: full transformer passes saved against compositional-benchmark accuracy lost.

Runs the benchmark once without a cache and once per method and threshold, on the same prompts and seeds, and
prints one JSON object (per cell: all-correct and per-metric accuracy, calls, full passes, seconds per image) and a
markdown table. The issue's target: >= 1.5x fewer full passes for <= 1 point of all-correct accuracy.

    python benchmarks/caching.py                          # built-in model, 10 prompts per category and language
    python benchmarks/caching.py --model tiny --n 1       # smoke
    python benchmarks/caching.py --fbc 0.15 --teacache --start 0.2 --max-skips 2   # guarded reuse
"""

from __future__ import annotations

import argparse
import sys
import time

import chromaflow
from chromaflow.benchmark import emit
from chromaflow.engine.evaluate import METRICS
from chromaflow.pipeline.pipeline import CACHE_START
from chromaflow.pipeline.training import evaluate_pipeline

TARGET_PASS_RATIO, TARGET_LOSS = 1.5, 0.01


def run(model: str, fbc: list[float], teacache: list[float], n: int, seed: int, steps: int | None,
        cache_start: float = CACHE_START, max_skips: int | None = None) -> dict:
    pipe = chromaflow.load(model)
    steps = steps or pipe.defaults.steps
    cells = []
    for method, threshold in [(None, None), *(("fbc", t) for t in fbc), *(("teacache", t) for t in teacache)]:
        start = time.perf_counter()
        guard = dict(cache_start=cache_start, cache_max_skips=max_skips) if method else {}
        report = evaluate_pipeline(pipe, n_per_category=n, seed=seed, steps=steps, cache=method,
                                   cache_threshold=threshold, **guard)
        seconds = time.perf_counter() - start
        counts = report.get("cache", {})  # absent without a cache
        calls, full = counts.get("calls"), counts.get("full_passes")
        cells.append({"method": method or "off", "threshold": threshold, "images": report["overall"]["n"],
                      "pass_ratio": round(calls / full, 3) if full else 1.0, "calls": calls, "full_passes": full,
                      "seconds_per_image": round(seconds / report["overall"]["n"], 3),
                      "accuracy": {m: report["overall"][m] for m in METRICS}})
        cell = cells[-1]  # progress, so a run cut short still shows what it measured
        print(f"... {cell['method']} {threshold}: all-correct {100 * cell['accuracy']['all_correct']:.1f}%, "
              f"{cell['pass_ratio']:.2f}x fewer passes, {cell['seconds_per_image']:.2f} s/image",
              file=sys.stderr, flush=True)
    base = cells[0]
    for cell in cells:
        cell["accuracy_loss"] = round(base["accuracy"]["all_correct"] - cell["accuracy"]["all_correct"], 4)
        cell["speedup"] = round(base["seconds_per_image"] / cell["seconds_per_image"], 3)
        cell["meets_target"] = cell["pass_ratio"] >= TARGET_PASS_RATIO and cell["accuracy_loss"] <= TARGET_LOSS
    return {"model": pipe.name, "steps": steps, "n_per_category": n, "seed": seed, "cache_start": cache_start,
            "cache_max_skips": max_skips, "cells": cells}


def markdown(result: dict) -> str:
    lines = [f"{result['model']}, {result['steps']} steps, {result['n_per_category']} prompts per category and "
             f"language (same prompts and seeds in every row); cache_start {result['cache_start']}, "
             f"cache_max_skips {result['cache_max_skips']}", "",
             "| cache | threshold | fewer full passes | all-correct % | loss (points) | s/image | speed-up | target |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in result["cells"]:
        lines.append(f"| {c['method']} | {c['threshold'] if c['threshold'] is not None else '-'} | "
                     f"{c['pass_ratio']:.2f}x | {100 * c['accuracy']['all_correct']:.1f} | "
                     f"{100 * c['accuracy_loss']:+.1f} | {c['seconds_per_image']:.2f} | {c['speedup']:.2f}x | "
                     f"{'met' if c['meets_target'] else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="built-in name or model folder (default: the built-in model)")
    ap.add_argument("--fbc", type=float, nargs="*", default=[0.05, 0.1, 0.2], help="First Block Cache thresholds")
    ap.add_argument("--teacache", type=float, nargs="*", default=[0.15, 0.3, 0.6], help="TeaCache thresholds")
    ap.add_argument("--n", type=int, default=10, help="prompts per category and language")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=float, default=CACHE_START,
                    help=f"cache_start: this first fraction of the steps runs in full (default {CACHE_START})")
    ap.add_argument("--max-skips", type=int, help="cache_max_skips: at most this many reuses in a row")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    result = run(args.model, args.fbc, args.teacache, args.n, args.seed, args.steps, args.start, args.max_skips)
    emit(result, markdown(result), args.out)


if __name__ == "__main__":
    main()
