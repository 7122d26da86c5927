"""Where a transformer forward's time goes: linear layers, attention, everything else, and the MFU each allows.

    python benchmarks/mfu_breakdown.py [--model default|large] [--batch 2 8] [--compile] [--json] [--quick]

One forward is profiled (torch.profiler, self time per op): the matmuls of every Linear, the attention kernel, and
the rest (norms, modulation, RoPE, GELU, copies; with --compile, inductor's fused kernels). Each matmul group is
also read as GFLOP/s against the bf16 matmul peak measured in the same run. `ceiling_mfu` is the MFU the forward
would reach if the rest took no time at all: the bound the matmul and attention kernels set.
"""

import argparse
import json
import time

import torch

from chromaflow import benchmark
from chromaflow.models.transformer import build
from chromaflow.pipeline.loading import load

LINEAR_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear")  # bmm: our forward has none outside SDPA
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                 "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention")


def breakdown(model, side: int, visible: int, batch: int, repeats: int, peak: float) -> dict:
    p = model.params
    *args, mask = benchmark.forward_inputs(p, side, visible, batch, next(model.parameters()).dtype)
    flops = benchmark.forward_flops(p, side * side, visible, batch)
    with torch.inference_mode():
        for _ in range(2):  # warm-up (and the compile, with --compile)
            model(*args, txt_mask=mask)
        start = time.perf_counter()
        with torch.profiler.profile() as prof:
            for _ in range(repeats):
                model(*args, txt_mask=mask)
        wall = (time.perf_counter() - start) / repeats
    seconds = {"linear": 0.0, "attention": 0.0}
    for event in prof.key_averages():
        group = "linear" if event.key in LINEAR_OPS else "attention" if event.key in ATTENTION_OPS else None
        if group:
            seconds[group] += event.self_cpu_time_total / 1e6 / repeats
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6 / repeats
    seconds["other"] = total - seconds["linear"] - seconds["attention"]
    gflops = {k: flops[k] / 1e9 for k in ("linear", "attention", "total")}
    return {"batch": batch, "tokens_img": side * side, "tokens_txt": visible, "gflops": gflops,
            "ms": {k: 1e3 * v for k, v in seconds.items()}, "ms_profiled_total": 1e3 * total,
            "ms_wall": 1e3 * wall,
            "share_of_time": {k: v / total for k, v in seconds.items()},
            "gflops_per_s": {k: gflops[k] / seconds[k] for k in ("linear", "attention")},
            "fraction_of_peak": {k: gflops[k] / seconds[k] / peak for k in ("linear", "attention")},
            "mfu": gflops["total"] / total / peak,
            "ceiling_mfu": gflops["total"] / (seconds["linear"] + seconds["attention"]) / peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="default (the built-in model), large (random ~180M) or tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 8], help="batch sizes (2 = one image with CFG)")
    ap.add_argument("--side", type=int, default=16, help="image tokens per side (16: 256 px for the built-in model)")
    ap.add_argument("--txt", type=int, default=16, help="visible text tokens")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks (MMDiT.compile_blocks)")
    ap.add_argument("--json", action="store_true", help="print only the JSON report")
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run of seconds")
    args = ap.parse_args()
    if args.quick:
        args.model, args.batch, args.side, args.txt, args.repeats = "tiny", [1], 4, 4, 1
    if args.model == "default":
        model = load("default").transformer
    else:
        torch.manual_seed(0)
        model = build(benchmark.LARGE if args.model == "large" else args.model)
    model = model.to(torch.bfloat16).eval()
    if args.compile:
        model.compile_blocks()
    peak = benchmark.matmul_peak(torch.bfloat16, *(((512,), 0.3) if args.quick else ((1024, 2048), 2.0)))
    report = {"machine": benchmark.machine_info(), "model": args.model, "compiled": args.compile,
              "matmul_peak_gflops": peak, "parameters": sum(p.numel() for p in model.parameters()),
              "runs": [breakdown(model, args.side, args.txt, b, args.repeats, peak) for b in args.batch]}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{report['parameters'] / 1e6:.1f}M parameters, bf16{', compiled' * args.compile}, "
          f"bf16 matmul peak {peak:.0f} GFLOP/s")
    print("| batch | ms | linear ms (% of peak) | attention ms (% of peak) | other ms | MFU | ceiling MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        ms, frac = r["ms"], r["fraction_of_peak"]
        print(f"| {r['batch']} | {r['ms_profiled_total']:.1f} | {ms['linear']:.1f} ({100 * frac['linear']:.0f}%) | "
              f"{ms['attention']:.1f} ({100 * frac['attention']:.0f}%) | {ms['other']:.1f} | {r['mfu']:.2f} | "
              f"{r['ceiling_mfu']:.2f} |")


if __name__ == "__main__":
    main()
