"""Transformer forward latency vs image size and vs prompt length, ours vs diffusers, same weights and dtype.

    python benchmarks/transformer_curves.py [--model default|large] [--dtype bf16|fp32] [--quick] [--json]

The prompt-length curve shows what dropping Chroma's hidden pads buys: our cost follows the visible tokens,
the peer pays for all 512 slots whatever the prompt.
"""

import argparse
import json

import torch

from chromaflow import benchmark
from chromaflow.models.transformer import build
from chromaflow.pipeline.loading import load


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="default (the built-in model) or large (random ~190M)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run of seconds")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print only the JSON report")
    ap.add_argument("--compile", action="store_true", help="ours with torch.compile'd blocks "
                    "(MMDiT.compile_blocks; the first call of each shape pays the compile, outside the timing)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.quick:
        model, sides, lengths = build("tiny"), [2, 4], [2, 16]
    elif args.model == "large":
        torch.manual_seed(0)
        model, sides, lengths = build(benchmark.LARGE), [8, 16, 32], [2, 32, 128, 512]
    else:
        model, sides, lengths = load(args.model).transformer, [8, 16, 32], [2, 16, 64, 256, 512]
    model = model.to(dtype).eval()
    peer = benchmark.peer_transformer(model)  # before compiling: the peer gets plain copies of the weights
    if args.compile:
        model.compile_blocks()
    peak = benchmark.matmul_peak(dtype, (512,) if args.quick else (1024, 2048), 0.3 if args.quick else 2.0)
    run = dict(repeats=1 if args.quick else args.repeats, peak_gflops=peak, peer_model=peer)
    report = {"machine": benchmark.machine_info(), "dtype": args.dtype, "compiled": args.compile,
              "matmul_peak_gflops": peak,
              "parameters": sum(p.numel() for p in model.parameters()),
              "resolution": [benchmark.bench_transformer(model, s, lengths[1], **run) for s in sides],
              "prompt_length": [benchmark.bench_transformer(model, sides[1], n, **run) for n in lengths]}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['parameters'] / 1e6:.1f}M parameters, {args.dtype}{', ours compiled' * args.compile}, "
          f"matmul peak {peak:.0f} GFLOP/s")
    print("| img tokens | txt tokens | ours ms | peer ms (512 slots) | ratio | peer ms (visible only) | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in report["resolution"] + report["prompt_length"]:
        print(f"| {r['tokens_img']} | {r['tokens_txt']} | {1e3 * r['ours']['median']:.1f} | "
              f"{1e3 * r['peer']['median']:.1f} | {r['ratio']:.2f}x | {1e3 * r['peer_short']['median']:.1f} | "
              f"{r['mfu']:.2f} |")


if __name__ == "__main__":
    main()
