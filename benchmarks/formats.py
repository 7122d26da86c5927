"""Accuracy and cost of every weight format on this CPU: the same transformer written as bf16 safetensors, GGUF
(F16, Q8_0 ... Q4_0), int8, ComfyUI scaled fp8 and NF4, each loaded in a fresh process.

Per format: relative output error against the bf16 model on fixed inputs (one forward = one denoising step at
cfg 1), file size and bits per weight, load time, the process's peak RSS, resident weight bytes, and seconds per
step (median of repeats after a warm-up). Compute is bfloat16 throughout. Prints one JSON object, then a markdown
table. A benchmark, not a test; run it on an otherwise idle machine.

    python benchmarks/formats.py                          # the built-in model, every format
    python benchmarks/formats.py --model path/to/model    # any checkpoint or model folder
    python benchmarks/formats.py --quick                  # tiny random model, a few formats: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from chromaflow.benchmark import emit

FORMATS = ["bf16", "F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "int8", "fp8", "nf4"]
QUICK_FORMATS = ["bf16", "Q8_0", "Q4_K", "Q4_0", "int8", "fp8", "nf4"]


def transformer_file(model: str, folder: Path) -> Path:
    """The checkpoint to start from: a built-in name, a model folder (model.json) or a checkpoint path."""
    from chromaflow.formats.layouts import save_transformer
    from chromaflow.pipeline.loading import BUILTIN_DIR, _RANDOM, random_pipeline
    if model == "default":
        return BUILTIN_DIR / "transformer.safetensors"
    if model in _RANDOM:
        return save_transformer(random_pipeline(model).transformer, folder / f"{model}.safetensors")
    path = Path(model)
    if (path / "model.json").is_file():
        return path / json.loads((path / "model.json").read_text()).get("transformer", "transformer.safetensors")
    return path


def write_formats(source: Path, folder: Path, formats: list[str]) -> dict[str, Path]:
    from chromaflow.formats.convert import convert_checkpoint
    reference = convert_checkpoint(source, folder / "bf16.safetensors", "original", dtype=torch.bfloat16)
    files = {}
    for fmt in formats:
        if fmt == "bf16":
            files[fmt] = reference
        elif fmt in ("int8", "fp8", "nf4"):
            files[fmt] = convert_checkpoint(reference, folder / f"{fmt}.safetensors", fmt)
        else:
            files[fmt] = convert_checkpoint(reference, folder / f"{fmt}.gguf", f"gguf:{fmt}")
    return files


def fixed_inputs(params, side: int, visible: int):
    from chromaflow.benchmark import random_text
    from chromaflow.models.text import chroma_mask
    from chromaflow.models.transformer import image_ids
    g = torch.Generator().manual_seed(0)
    img = torch.randn(1, side * side, params.in_channels, generator=g)
    txt, real = random_text(params, 1, visible - 1, seed=1)  # real tokens; chroma_mask adds the one pad
    mask = chroma_mask(real)
    return dict(img=img, img_ids=image_ids(1, side, side), txt=txt, txt_ids=torch.zeros(1, txt.shape[1], 3),
                timesteps=torch.tensor([0.6]), txt_mask=mask)


def child(path: str, out: str, side: int, visible: int, repeats: int) -> None:
    """In a fresh process: load, time the steps, write the output; print one JSON line."""
    from chromaflow.benchmark import measure, peak_rss_mb
    from chromaflow.formats.checkpoint import save_checkpoint
    from chromaflow.formats.layouts import load_transformer
    baseline = peak_rss_mb()  # python + torch, before any weight is read
    start = time.perf_counter()
    model, info = load_transformer(path, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    inputs = fixed_inputs(model.params, side, visible)
    with torch.no_grad():
        timing = measure(lambda: model(**inputs), repeats=repeats)
        output = model(**inputs).float()
    save_checkpoint({"output": output}, out)
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({"load_s": load_s, "step_s": timing, "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline,
                      "weights_mb": resident / 2 ** 20, "quantized": info["quantized"]}))


def run(model: str, formats: list[str], side: int, visible: int, repeats: int, folder: Path, log) -> dict:
    from chromaflow.benchmark import machine_info
    from chromaflow.formats.checkpoint import open_checkpoint
    from chromaflow.formats.layouts import analyze
    source = transformer_file(model, folder)
    log(f"writing {len(formats)} formats of {source}")
    files = write_formats(source, folder, formats)
    with open_checkpoint(files["bf16"]) as ckpt:
        parameters = sum(ckpt.numel(k) for k in ckpt.keys())
        params = analyze(ckpt).params
    rows, reference = [], None
    for fmt, path in files.items():
        log(f"measuring {fmt}")
        out = folder / f"out-{fmt}.safetensors"
        proc = subprocess.run([sys.executable, __file__, "--child", str(path), str(out), str(side), str(visible),
                               str(repeats)], capture_output=True, text=True, env={**os.environ})
        if proc.returncode:
            raise RuntimeError(f"{fmt}: the measuring process failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        with open_checkpoint(out) as ckpt:
            output = ckpt.get("output")
        reference = output if reference is None else reference  # bf16 is measured first
        size = path.stat().st_size
        row.update(format=fmt, file_mb=size / 2 ** 20, bits_per_weight=8 * size / parameters,
                   rel_error=float((output - reference).norm() / reference.norm()))
        rows.append(row)
    return {"benchmark": "formats", "model": model, "parameters": parameters, "params": params.to_dict(),
            "image_tokens": side * side, "text_tokens": visible, "machine": machine_info(),
            "date": time.strftime("%Y-%m-%d"), "rows": rows}


def table(report: dict) -> str:
    lines = [f"Model `{report['model']}` ({report['parameters']:,} parameters), one forward with "
             f"{report['image_tokens']} image + {report['text_tokens']} text tokens, bf16 compute, "
             f"{report['machine']['threads']} threads.", "",
             "| format | bits/weight | file MB | rel. error vs bf16 | load s | peak RSS MB (over imports) | "
             "weights MB | s/step |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['format']} | {r['bits_per_weight']:.2f} | {r['file_mb']:.1f} | {r['rel_error']:.4f} | "
                     f"{r['load_s']:.2f} | {r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['baseline_rss_mb']:.0f}) | "
                     f"{r['weights_mb']:.1f} | {r['step_s']['median']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, out, side, visible, repeats = sys.argv[2:7]
        child(path, out, int(side), int(visible), int(repeats))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="built-in name (default, tiny), model folder or checkpoint")
    ap.add_argument("--formats", nargs="+", help=f"subset of {' '.join(FORMATS)} (bf16 is always measured)")
    ap.add_argument("--side", type=int, help="image token grid side (default 16: 256 px; quick 8)")
    ap.add_argument("--text", type=int, default=16, help="visible text tokens (default 16)")
    ap.add_argument("--repeats", type=int, help="timed steps per format after a warm-up (default 5; quick 2)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, a few formats: seconds")
    ap.add_argument("--keep", help="write the converted files into this folder and keep them")
    ap.add_argument("--out", help="also write the JSON report here")
    args = ap.parse_args()
    model = "tiny" if args.quick and args.model == "default" else args.model
    formats = ["bf16"] + [f for f in (args.formats or (QUICK_FORMATS if args.quick else FORMATS)) if f != "bf16"]
    side = args.side or (8 if args.quick else 16)
    repeats = args.repeats or (2 if args.quick else 5)
    log = lambda s: print(f"... {s}", file=sys.stderr)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        report = run(model, formats, side, args.text, repeats, folder, log)
    emit(report, table(report), args.out)


if __name__ == "__main__":
    main()
