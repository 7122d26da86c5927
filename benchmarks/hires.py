"""Beyond the native size on the built-in model: cost and object duplication of the large-image modes.

1. Cost: seconds and peak memory per image at 1x, 4x and 16x the native pixel count, for plain generation,
   windowed attention (`attention_window` = the native size) and MultiDiffusion (`tile` = the native size, stride
   half of it), plus the VAE decode alone with and without tiles. Generation decodes with `vae_tile` = the native
   size, so its peak is the sampling's, not the full-size decode's (the VAE rows show that). Each cell runs in a
   process of its own, so its peak is its own: on CUDA the allocator's peak, on the CPU the process's peak RSS
   (the RSS after loading the model is given as `baseline_mb`).
2. Attention alone: one joint attention call (the model's heads and head size, 20 text tokens) over the image
   grid at each pixel factor, full vs windowed (native-size windows): the quadratic vs linear growth.
3. Duplication: the compositional benchmark's counting prompts (English) at 2x and 4x the native *side*, images
   scored after downscaling to the native size: count accuracy, detected / requested objects, the share of images
   with more objects than requested (duplication) and with none (lost objects), for plain, RoPE scaling (NTK,
   interpolation) and windowed attention alone and combined ((a)+(b) of pipeline/hires.py), and the hires fix;
   the native size is the reference row.
A benchmark, not a test. Prints one JSON object and markdown tables.

    python benchmarks/hires.py                        # the full tables (long on a CPU: run it on an idle machine)
    python benchmarks/hires.py --smoke                # seconds: tiny random model, 2 steps, one process
    python benchmarks/hires.py --device cuda --out hires.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import torch
from PIL import Image

import chromaflow
from chromaflow.benchmark import emit, peak_rss_mb
from chromaflow.engine.evaluate import benchmark_prompts, detect, evaluate_images, sample_grid
from chromaflow.models.transformer import WindowedAttention, attention, image_ids, position_embedding

PROMPT = "a red circle above a blue square"


def cost_modes(native: int) -> dict[str, dict]:
    return {"plain": {}, "windowed attention": {"attention_window": native},
            "MultiDiffusion": {"tile": native, "tile_stride": native // 2}}


def duplication_modes(native: int, scale: int) -> dict[str, dict]:
    window = {"attention_window": native}
    return {"plain": {}, "RoPE NTK": {"rope_scaling": "ntk"}, "RoPE interpolate": {"rope_scaling": "interpolate"},
            "windows": window, "RoPE NTK + windows": {"rope_scaling": "ntk", **window},
            "RoPE interpolate + windows": {"rope_scaling": "interpolate", **window},
            "RoPE NTK + windows, first half of the steps": {"rope_scaling": "ntk", **window,
                                                            "attention_window_steps": 0.5},
            "hires fix (latent, 0.5)": {"hires_scale": scale, "hires_strength": 0.5}}


# --- one cost cell, in its own process -------------------------------------------------------------------------

def cost_cell(cell: dict) -> dict:
    pipe = chromaflow.load(cell["model"], device=cell["device"])
    cuda = cell["device"].startswith("cuda")
    baseline = torch.cuda.memory_allocated() / 2**20 if cuda else peak_rss_mb()
    side, steps = cell["side"], cell["steps"]
    if cell["mode"].startswith("VAE decode"):
        latents = torch.randn(1, pipe.vae.latent_channels, side // 8, side // 8, device=cell["device"])
        tile = pipe.defaults.width if "tiles" in cell["mode"] else None
        run = lambda: pipe.vae.decode(latents, tile=tile)  # noqa: E731
    else:
        settings = dict(cell["settings"], width=side, height=side, steps=steps, seed=0, progress=False,
                        vae_tile=pipe.defaults.width)
        run = lambda: pipe(PROMPT, **settings)  # noqa: E731
    with torch.no_grad():
        run()  # warm-up (at the cell's own size: the peak is the same)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(cell["repeats"]):
            start = time.perf_counter()
            run()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return {"seconds": round(statistics.median(times), 4), "peak_mb": round(peak), "baseline_mb": round(baseline)}


def run_cost(model: str, device: str, native: int, steps: int, repeats: int, factors: list[int],
             isolate: bool = True) -> list[dict]:
    """Every mode at every pixel factor; `isolate` runs each cell in a fresh process (its own peak memory)."""
    rows = []
    modes = {**cost_modes(native), "VAE decode": {}, "VAE decode, tiles": {}}
    for mode, settings in modes.items():
        for factor in factors:
            side = round(native * math.sqrt(factor) / 16) * 16
            cell = dict(model=model, device=device, mode=mode, settings=settings, side=side, steps=steps,
                        repeats=repeats)
            if isolate:
                done = subprocess.run([sys.executable, __file__, "--cell", json.dumps(cell)], capture_output=True,
                                      text=True)
                if done.returncode:
                    raise RuntimeError(f"cell {mode} x{factor} failed:\n{done.stderr[-2000:]}")
                measured = json.loads(done.stdout.splitlines()[-1])
            else:
                measured = cost_cell(cell)
            rows.append({"mode": mode, "pixels": factor, "side": side, **measured})
            print(f"... {mode} x{factor}: {rows[-1]}", file=sys.stderr)
    return rows


# --- attention alone ---------------------------------------------------------------------------------------------

def run_attention(model: str, device: str, native: int, factors: list[int], repeats: int = 3) -> list[dict]:
    p = chromaflow.load(model).transformer.params
    grid, n_txt, rows = native // 16, 20, []
    for factor in factors:
        side = round(grid * math.sqrt(factor))
        ids = torch.cat([torch.zeros(1, n_txt, 3), image_ids(1, side, side)], 1).to(device)
        pe = position_embedding(ids, p.axes_dim, p.theta)
        q, k, v = (torch.randn(1, p.num_heads, ids.shape[1], p.head_dim, device=device) for _ in range(3))
        row = {"pixels": factor, "image_tokens": side * side}
        for name, window in (("full_s", None), ("windowed_s", WindowedAttention((side, side), (grid, grid)))):
            times = []
            for _ in range(repeats + 1):  # the first is a warm-up
                start = time.perf_counter()
                attention(q, k, v, pe, None, window)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            row[name] = round(statistics.median(times[1:]), 5)
        rows.append(row)
        print(f"... attention x{factor}: {row}", file=sys.stderr)
    return rows


# --- duplication ------------------------------------------------------------------------------------------------

def run_duplication(model: str, device: str, native: int, steps: int | None, n: int, scales: list[int],
                    batch: int, grid: str | None = None, modes: list[str] | None = None) -> list[dict]:
    """Every mode (or those named in `modes`) at every scale on the counting prompts; `grid` saves the first 6
    images of each cell."""
    pipe = chromaflow.load(model, device=device)
    specs = [s for s in benchmark_prompts(n) if s.category == "counting" and s.language == "en"]
    cells = [("native", 1, {})] + [(mode, scale, settings) for scale in scales
                                   for mode, settings in duplication_modes(native, scale).items()
                                   if modes is None or mode.lower() in modes]
    rows, shown, captions = [], [], []
    for mode, scale, settings in cells:
        size = native if "hires_scale" in settings else native * scale
        images, start = [], time.perf_counter()
        for i in range(0, len(specs), batch):
            out = pipe([s.text for s in specs[i:i + batch]], width=size, height=size, seed=i, progress=False,
                       **({"steps": steps} if steps else {}), **settings)
            images += [im.resize((native, native), Image.LANCZOS) for im in out.images]
        seconds = (time.perf_counter() - start) / len(specs)
        report = evaluate_images(images, specs)
        found, asked = [len(detect(im)) for im in images], [len(s.objects) for s in specs]
        rows.append({"mode": mode, "scale": scale, "count_accuracy": report["overall"]["count"],
                     "objects_per_requested": round(statistics.mean(f / a for f, a in zip(found, asked)), 3),
                     "more_than_requested": statistics.mean(f > a for f, a in zip(found, asked)),
                     "no_object": statistics.mean(f == 0 for f in found),
                     "seconds_per_image": round(seconds, 3), "images": len(specs)})
        print(f"... {mode} x{scale}: {rows[-1]}", file=sys.stderr)
        shown += images[:6]
        captions += [f"{mode} x{scale}"] * len(images[:6])
    if grid:
        sample_grid(shown, captions, grid, cols=6)
    return rows


# --- report -----------------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    lines = []
    if result["cost"]:
        factors = sorted({r["pixels"] for r in result["cost"]})
        sides = {r["pixels"]: r["side"] for r in result["cost"]}
        plain = {r["pixels"]: r for r in result["cost"] if r["mode"] == "plain"}
        lines += [f"Cost per image ({result['model']}, {result['device']}, {result['steps']} steps): seconds, peak "
                  "MB, time vs plain", "", "| mode | " + " | ".join(f"{f}x pixels ({sides[f]} px)" for f in factors)
                  + " |", "|---|" + "---:|" * len(factors)]
        for mode in dict.fromkeys(r["mode"] for r in result["cost"]):
            cells = []
            for f in factors:
                r = next(r for r in result["cost"] if r["mode"] == mode and r["pixels"] == f)
                vs = "" if mode.startswith("VAE") else f", {r['seconds'] / plain[f]['seconds']:.2f}x"
                cells.append(f"{r['seconds']:.3g} s, {r['peak_mb']} MB{vs}")
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if result["attention"]:
        lines += ["", "One attention call, seconds: full vs windows of the native size", "",
                  "| pixels | image tokens | full | windowed | full / windowed |", "|---:|---:|---:|---:|---:|"]
        for r in result["attention"]:
            lines.append(f"| {r['pixels']}x | {r['image_tokens']} | {r['full_s']:.4g} | {r['windowed_s']:.4g} | "
                         f"{r['full_s'] / r['windowed_s']:.1f}x |")
    if result["duplication"]:
        lines += ["", f"Object duplication, counting prompts ({result['duplication'][0]['images']} images per cell, "
                  "scored at the native size)", "",
                  "| mode | scale (side) | count accuracy % | objects / requested | more than requested % | "
                  "no object % | s / image |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["duplication"]:
            lines.append(f"| {r['mode']} | {r['scale']}x | {100 * r['count_accuracy']:.1f} | "
                         f"{r['objects_per_requested']:.2f} | {100 * r['more_than_requested']:.0f} | "
                         f"{100 * r['no_object']:.0f} | {r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    mode_names = list(duplication_modes(256, 2))  # the names do not depend on the sizes
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="built-in name or model folder (default: the built-in model)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ap.add_argument("--repeats", type=int, help="timed runs per cost cell after a warm-up (default: 3 on CUDA, 1)")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16], help="pixel-count factors for the cost")
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 4], help="side factors for duplication")
    ap.add_argument("--n", type=int, default=50, help="counting prompts (English)")
    ap.add_argument("--modes", nargs="+", metavar="MODE", help="duplication modes to run (default: all): "
                    + "; ".join(f"'{m}'" for m in mode_names))
    ap.add_argument("--batch", type=int, default=8, help="images per pipeline call in the duplication part")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps, 2 prompts, all in one "
                    "process (peak memory then accumulates): seconds")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: one cost cell, in a subprocess
    ap.add_argument("--parts", nargs="+", choices=["cost", "attention", "duplication"],
                    default=["cost", "attention", "duplication"])
    ap.add_argument("--grid", help="save the first images of each duplication cell to this PNG")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.cell:
        print(json.dumps(cost_cell(json.loads(args.cell))))
        return
    if args.modes:
        args.modes = [m.lower() for m in args.modes]
        unknown = sorted(set(args.modes) - {m.lower() for m in mode_names})
        if unknown:
            ap.error(f"unknown --modes {unknown}; choose from: " + "; ".join(mode_names))
    if args.smoke:
        args.model, args.steps, args.n, args.factors, args.scales = "tiny", 2, 2, [1, 4], [2]
    native = chromaflow.load(args.model).defaults.width
    steps = args.steps or chromaflow.load(args.model).defaults.steps
    repeats = args.repeats or (3 if args.device.startswith("cuda") else 1)
    result = {"model": args.model, "device": args.device, "steps": steps, "native": native,
              "torch": torch.__version__, "cost": [], "attention": [], "duplication": []}
    if "cost" in args.parts:
        result["cost"] = run_cost(args.model, args.device, native, steps, repeats, args.factors, not args.smoke)
    if "attention" in args.parts:
        result["attention"] = run_attention(args.model, args.device, native, sorted(set(args.factors) | {64}))
    if "duplication" in args.parts:
        result["duplication"] = run_duplication(args.model, args.device, native, steps, args.n, args.scales,
                                                args.batch, args.grid, args.modes)
    emit(result, markdown(result), args.out)


if __name__ == "__main__":
    main()
