"""Full-size Chroma on a small machine: a randomly initialised 8.9B transformer written as a Q4_0 (or Q4_K) GGUF,
loaded memory-mapped, one denoising step at 512x512 on the CPU. Reports peak RSS (and how much of it is file-backed
mapped weights vs anonymous memory) and seconds per step. stable-diffusion.cpp is the anchor: it keeps the same
blocks quantized and computes integer dot products; we expand one layer at a time to bfloat16 and use oneDNN.

The file is written streaming (one tensor generated, quantized and written at a time), so writing needs about one
layer of memory; loading maps the file and copies only the small F32 tensors. `--peer` also runs diffusers'
GGUF loader (`from_single_file` + GGUFQuantizationConfig; needs `accelerate`) on the same file and inputs.
Not a test: the full run takes minutes and ~5 GB of disk.

    python benchmarks/full_size_gguf.py                          # chroma, Q4_0, 512 px, one step
    python benchmarks/full_size_gguf.py --qtype Q4_K --keep /data/chroma-q4k.gguf
    python benchmarks/full_size_gguf.py --depth 1 --single 1 --peer    # real widths, 2 blocks: minutes -> seconds
    python benchmarks/full_size_gguf.py --preset tiny --size 64       # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import torch

from chromaflow.benchmark import emit

VAE_FACTOR, PATCH = 8, 2  # the Flux VAE downsamples 8x; the transformer packs 2x2 latent patches


def memory() -> dict:
    """Peak and current resident memory of this process, split into anonymous and file-backed (mapped) pages."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return {"peak_rss_mb": fields["VmHWM"], "rss_mb": fields["VmRSS"], "anon_mb": fields["RssAnon"],
            "file_mb": fields["RssFile"]}


class RandomWeights(Mapping):
    """A model's tensors made on demand, the same for the same key: Linear-style uniform(+-1/sqrt(fan_in)) weights,
    zero biases, unit norm scales."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0):
        self.shapes, self.seed = shapes, seed

    def __getitem__(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        if key.endswith(".scale"):
            return torch.ones(shape)
        if len(shape) == 1:
            return torch.zeros(shape)
        g = torch.Generator().manual_seed(self.seed * 2 ** 32 + zlib.crc32(key.encode()))
        bound = 1 / math.sqrt(shape[1])
        return torch.empty(shape).uniform_(-bound, bound, generator=g)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def params_for(args):
    from chromaflow.models.transformer import preset
    overrides = {k: v for k, v in dict(depth=args.depth, depth_single_blocks=args.single).items() if v is not None}
    return preset(args.preset, **overrides)


def shapes_of(params) -> dict[str, tuple[int, ...]]:
    from chromaflow.models.transformer import build
    return {k: tuple(v.shape) for k, v in build(params, device="meta").state_dict().items()}


def write(args, path: Path) -> dict:
    from chromaflow.formats.gguf import save_gguf
    from chromaflow.formats.layouts import modelspec
    params = params_for(args)
    shapes = shapes_of(params)
    meta = {"chromaflow.params": json.dumps(params.to_dict()), "chromaflow.layout": "original",
            **modelspec("chroma", f"random {args.preset} {args.qtype}", resolution="1024x1024")}
    start = time.perf_counter()
    save_gguf(RandomWeights(shapes), path, args.qtype, metadata=meta, shapes=shapes)
    return {"write_s": time.perf_counter() - start, "parameters": sum(math.prod(s) for s in shapes.values()),
            "file_gb": path.stat().st_size / 2 ** 30, **{f"write_{k}": v for k, v in memory().items()}}


def step_inputs(params, size: int, text: int) -> dict:
    """Packed noise for a size x size image, `text` visible T5-width tokens, t = 1 (the first step)."""
    side = size // VAE_FACTOR // PATCH
    g = torch.Generator().manual_seed(0)
    from chromaflow.models.transformer import image_ids
    return dict(img=torch.randn(1, side * side, params.in_channels, generator=g), img_ids=image_ids(1, side, side),
                txt=torch.randn(1, text, params.context_in_dim, generator=g), txt_ids=torch.zeros(1, text, 3),
                timesteps=torch.tensor([1.0]))


def ours(path: str, size: int, text: int, steps: int, out: str) -> dict:
    from chromaflow.formats.checkpoint import save_checkpoint
    from chromaflow.formats.layouts import load_transformer
    before = memory()
    start = time.perf_counter()
    model, info = load_transformer(path, dtype=torch.bfloat16)
    load_s, loaded = time.perf_counter() - start, memory()
    inputs = step_inputs(model.params, size, text)
    times, x = [], inputs["img"]
    sigmas = torch.linspace(1, 0, steps + 1)
    with torch.no_grad():
        for i in range(steps):  # Euler steps of the flow: x <- x + (t_next - t) v
            start = time.perf_counter()
            v = model(**{**inputs, "img": x, "timesteps": sigmas[i:i + 1]}).float()
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            times.append(time.perf_counter() - start)
            if i == 0:
                save_checkpoint({"v": v}, out)
    return {"load_s": load_s, "step_s": times, "quantized": info["quantized"], "before_load": before,
            "after_load": loaded, "end": memory(), "finite": bool(torch.isfinite(x).all())}


def peer(path: str, size: int, text: int, out: str) -> dict:
    """diffusers' ChromaTransformer2DModel loading the same GGUF (its single-file converter needs Chroma's real
    widths: hidden 3072)."""
    from diffusers import ChromaTransformer2DModel, GGUFQuantizationConfig
    from chromaflow.formats.checkpoint import save_checkpoint
    from chromaflow.formats.gguf import GGUFCheckpoint
    from chromaflow.formats.layouts import analyze, diffusers_config
    with GGUFCheckpoint(path) as ckpt:
        params = analyze(ckpt).params
    config = Path(tempfile.mkdtemp())
    (config / "config.json").write_text(json.dumps(diffusers_config(params)))
    start = time.perf_counter()
    model = ChromaTransformer2DModel.from_single_file(
        path, config=str(config), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16),
        torch_dtype=torch.bfloat16, low_cpu_mem_usage=True)
    load_s, loaded = time.perf_counter() - start, memory()
    inputs = step_inputs(params, size, text)
    with torch.no_grad():
        start = time.perf_counter()
        v = model(hidden_states=inputs["img"].bfloat16(), encoder_hidden_states=inputs["txt"].bfloat16(),
                  timestep=inputs["timesteps"], img_ids=inputs["img_ids"][0], txt_ids=inputs["txt_ids"][0],
                  return_dict=False)[0].float()
        step_s = time.perf_counter() - start
    save_checkpoint({"v": v}, out)
    return {"load_s": load_s, "step_s": [step_s], "after_load": loaded, "end": memory()}


def in_child(role: str, args, path: Path, out: Path, log) -> dict:
    """Run one side in a fresh process, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", role, str(path), str(args.size), str(args.text), str(args.steps),
           str(out)]
    log(f"{role}: {' '.join(cmd[2:])}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{role} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(report: dict) -> str:
    rows = [f"Random `{report['preset']}` ({report['parameters']:,} parameters) as {report['qtype']} GGUF "
            f"({report['file_gb']:.2f} GiB), {report['size']}x{report['size']} ({report['image_tokens']} image + "
            f"{report['text']} text tokens), bf16 compute, {report['threads']} threads, "
            f"{report['memory_gb']:.0f} GiB machine.", "",
            "| | load s | s / step | peak RSS GiB | at end: mapped file GiB | at end: anonymous GiB |",
            "|---|---|---|---|---|---|"]
    for name in ("ours", "peer"):
        r = report.get(name)
        if r:
            end, gib = r["end"], 1024
            rows.append(f"| {name} | {r['load_s']:.1f} | {sum(r['step_s']) / len(r['step_s']):.1f} | "
                        f"{end['peak_rss_mb'] / gib:.2f} | {end['file_mb'] / gib:.2f} | {end['anon_mb'] / gib:.2f} |")
    rows.append("")
    rows.append(f"Writing the file: {report['write_s']:.0f} s, peak RSS {report['write_peak_rss_mb'] / 1024:.2f} GiB.")
    if "peer_rel_diff" in report:
        rows.append(f"Velocity of the first step, ours vs peer: relative difference {report['peer_rel_diff']:.2e}.")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="chroma", help="model preset (default chroma, 8.9B)")
    ap.add_argument("--depth", type=int, help="double blocks (default: the preset's)")
    ap.add_argument("--single", type=int, help="single blocks (default: the preset's)")
    ap.add_argument("--qtype", default="Q4_0", help="GGUF type of the block weights (default Q4_0; e.g. Q4_K)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    ap.add_argument("--text", type=int, default=32, help="visible text tokens (default 32)")
    ap.add_argument("--steps", type=int, default=1, help="denoising steps to time (default 1)")
    ap.add_argument("--keep", help="GGUF path to write (and keep); reused when it exists")
    ap.add_argument("--peer", action="store_true", help="also run diffusers' GGUF loader on the same file")
    ap.add_argument("--out", help="also write the JSON report here")
    return ap


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--child"]:
        role, path, size, text, steps, out = argv[1:7]
        result = ours(path, int(size), int(text), int(steps), out) if role == "ours" else \
            peer(path, int(size), int(text), out)
        print(json.dumps(result))
        return
    if argv[:1] == ["--write"]:
        print(json.dumps(write(parser().parse_args(argv[2:]), Path(argv[1]))))
        return
    args = parser().parse_args(argv)
    log = lambda s: print(f"... {s}", file=sys.stderr)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / f"{args.preset}-{args.qtype}.gguf"
        report = {"preset": args.preset, "qtype": args.qtype, "size": args.size, "text": args.text,
                  "image_tokens": (args.size // VAE_FACTOR // PATCH) ** 2, "threads": torch.get_num_threads(),
                  "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30,
                  "date": time.strftime("%Y-%m-%d")}
        if path.is_file():
            log(f"reusing {path}")
            report.update(write_s=0.0, write_peak_rss_mb=0.0, file_gb=path.stat().st_size / 2 ** 30,
                          parameters=sum(math.prod(s) for s in shapes_of(params_for(args)).values()))
        else:
            log(f"writing {path}")  # in a child: the writer's memory must not count towards the loader's peak
            proc = subprocess.run([sys.executable, __file__, "--write", str(path), *argv], capture_output=True,
                                  text=True)
            if proc.returncode:
                raise RuntimeError(f"writing failed:\n{proc.stderr[-4000:]}")
            report.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        report["ours"] = in_child("ours", args, path, Path(tmp) / "ours.safetensors", log)
        if args.peer:
            from chromaflow.formats.checkpoint import open_checkpoint
            report["peer"] = in_child("peer", args, path, Path(tmp) / "peer.safetensors", log)
            with open_checkpoint(Path(tmp) / "ours.safetensors") as a, \
                    open_checkpoint(Path(tmp) / "peer.safetensors") as b:
                report["peer_rel_diff"] = float((a.get("v") - b.get("v")).norm() / b.get("v").norm())
    emit(report, table(report), args.out)


if __name__ == "__main__":
    main()
