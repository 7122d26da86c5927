"""Benchmarks: every figure measured side by side with a peer in the same run, so it reads as a ratio.

The peer is diffusers (`ChromaTransformer2DModel`, `ChromaPipeline`) holding the very same weights, converted to its
layout, at the same size, steps, cfg and dtype. Each timing is min / median / max over repeats after warm-up, and
the CPU's measured matmul peak turns model FLOPs into MFU (model FLOPs utilisation).

Text for the peer is what its pipeline makes: Chroma pads T5 to 512 tokens and hides all but one pad, so the peer
gets 512 slots with that mask (the `*_short` figures give it only the visible tokens instead).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .formats.layouts import original_to_diffusers
from .models.precision import fast_bf16
from .models.text import chroma_mask
from .models.transformer import MMDiT, MMDiTParams, build, image_ids
from .models.vae import pack

PEER_PAD = 512  # ChromaPipeline's max_sequence_length


# --- measuring ------------------------------------------------------------------------------------------------

def measure(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> dict:
    """Seconds per call of fn: min / median / max over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "repeats": repeats}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine_info() -> dict:
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "model name")):
                flags += line
    return {"cpu": next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")),
                        platform.processor()),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_bf16" in flags, "fast_bf16": fast_bf16("cpu")}


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048), seconds: float = 1.0) -> float:
    """Best GFLOP/s of square matmuls in `dtype` (the hardware limit MFU is measured against)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / len(sizes):
            torch.mm(a, b)
            runs += 1
        best = max(best, 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e9)
    return best


def forward_flops(p: MMDiTParams, n_img: int, n_txt: int, batch: int = 1) -> dict:
    """FLOPs of one transformer forward: `linear` (every Linear) and `attention` (QK^T and AV)."""
    h, m, n = p.hidden_size, p.mlp_hidden, n_img + n_txt
    double = (n_img + n_txt) * 2 * (4 * h * h + 2 * h * m)  # each stream: qkv + proj + mlp
    single = n * 2 * (h * (3 * h + m) + (h + m) * h)
    io = 2 * (n_img * p.in_channels * h + n_txt * p.context_in_dim * h + n_img * h * p.out_channels)
    mods = 0
    if p.variant == "chroma":
        a = p.approximator_hidden
        mods = 2 * p.mod_index_length * (p.approximator_in_dim * a + p.approximator_depth * 2 * a * a + a * h)
    linear = p.depth * double + p.depth_single_blocks * single + io + mods
    attention = (p.depth + p.depth_single_blocks) * 4 * n * n * h
    return {"linear": linear * batch, "attention": attention * batch, "total": (linear + attention) * batch}


# --- the peer ---------------------------------------------------------------------------------------------------

def peer_transformer(model: MMDiT):
    """diffusers' ChromaTransformer2DModel with `model`'s weights and dtype."""
    from diffusers import ChromaTransformer2DModel
    p = model.params
    ref = ChromaTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        axes_dims_rope=p.axes_dim, approximator_num_channels=p.approximator_in_dim,
        approximator_hidden_dim=p.approximator_hidden, approximator_layers=p.approximator_depth)
    ref.load_state_dict(original_to_diffusers(model.state_dict()), strict=True)
    return ref.to(next(model.parameters()).dtype).eval()


def pad_text(embeds: Tensor, real: Tensor, length: int = PEER_PAD) -> tuple[Tensor, Tensor]:
    """Right-pad an encoder's output to `length` slots with zeros; the mask shows the real tokens and the one pad
    after them (Chroma's rule), as ChromaPipeline's T5 path would produce."""
    extra = length - embeds.shape[1]
    if extra < 0:
        raise ValueError(f"text is {embeds.shape[1]} tokens, longer than the padding length {length}")
    return (torch.nn.functional.pad(embeds, (0, 0, 0, extra)),
            chroma_mask(torch.nn.functional.pad(real.bool(), (0, extra))))


# --- transformer forward ----------------------------------------------------------------------------------------

def random_text(p: MMDiTParams, batch: int, visible: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """`visible` text tokens per row (real ones plus Chroma's one pad), in a 512-slot padded tensor."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, PEER_PAD, p.context_in_dim, generator=g)
    mask = torch.arange(PEER_PAD)[None].expand(batch, -1) < visible
    return embeds, mask


def forward_inputs(p: MMDiTParams, side: int, visible: int, batch: int, dtype: torch.dtype) -> tuple:
    """(img, img_ids, txt, txt_ids, timesteps, txt_mask) for one forward at a side x side token grid with `visible`
    text tokens in 512 padded slots (timestep 0.5)."""
    g = torch.Generator().manual_seed(1)
    img = torch.randn(batch, side * side, p.in_channels, generator=g).to(dtype)
    txt, mask = random_text(p, batch, visible)
    return (img, image_ids(batch, side, side), txt.to(dtype), torch.zeros(batch, PEER_PAD, 3),
            torch.full((batch,), 0.5), mask)


def bench_transformer(model: MMDiT, side: int, visible: int, batch: int = 2, repeats: int = 3,
                      peak_gflops: float | None = None, peer: bool = True, peer_model=None) -> dict:
    """One forward at a side x side token grid with `visible` text tokens: ours (pads dropped) vs diffusers (512
    slots, masked), same weights and dtype."""
    p, dtype = model.params, next(model.parameters()).dtype
    img, ids, txt, txt_ids, t, mask = forward_inputs(p, side, visible, batch, dtype)
    flops = forward_flops(p, side * side, visible, batch)
    out = {"tokens_img": side * side, "tokens_txt": visible, "batch": batch, "gflops": flops["total"] / 1e9}
    with torch.inference_mode():
        out["ours"] = measure(lambda: model(img, ids, txt, txt_ids, t, txt_mask=mask), repeats)
        if peer:
            ref = peer_model if peer_model is not None else peer_transformer(model)
            joint = torch.cat([mask, torch.ones(batch, side * side, dtype=torch.bool)], 1)

            def run(text, ids_txt, attn):
                return ref(hidden_states=img, encoder_hidden_states=text, timestep=t.to(dtype), img_ids=ids[0],
                           txt_ids=ids_txt, attention_mask=attn, return_dict=False)[0]
            out["peer"] = measure(lambda: run(txt, txt_ids[0], joint), repeats)
            short = joint[:, list(range(visible)) + list(range(PEER_PAD, joint.shape[1]))]
            out["peer_short"] = measure(lambda: run(txt[:, :visible], txt_ids[0, :visible], short), repeats)
            out["ratio"] = out["peer"]["median"] / out["ours"]["median"]
            out["ratio_short"] = out["peer_short"]["median"] / out["ours"]["median"]
    if peak_gflops:
        out["mfu"] = flops["total"] / out["ours"]["median"] / 1e9 / peak_gflops
        if peer:
            out["peer_mfu"] = flops["total"] / out["peer_short"]["median"] / 1e9 / peak_gflops
    return out


# --- end to end -----------------------------------------------------------------------------------------------

def peer_pipeline(pipe, ref=None):
    """diffusers' ChromaPipeline around the same transformer weights and the same VAE (no text encoder: the
    prompt embeddings come from ours, padded as its T5 path would)."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    ref = ref if ref is not None else peer_transformer(pipe.transformer)
    dtype = next(ref.parameters()).dtype  # a diffusers user loads the whole pipeline in one torch_dtype
    vae = pipe.vae.to_diffusers(dtype)
    peer = ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=ref)
    peer.set_progress_bar_config(disable=True)
    return peer


def bench_txt2img(pipe, prompt: str, size: int, steps: int, cfg: float, repeats: int = 3, peer: bool = True,
                  seed: int = 0) -> dict:
    """Whole images: ours (text encode, sampling, VAE decode timed apart) vs ChromaPipeline on the same noise."""
    settings = dict(width=size, height=size, steps=steps, cfg=cfg, seed=seed, progress=False)
    out: dict = {"size": size, "steps": steps, "cfg": cfg}
    result = {}

    def ours():
        result["gen"] = pipe(prompt, **settings)
    out["ours"] = measure(ours, repeats)
    prompts = [prompt] + ([""] if cfg != 1 else [])
    out["text_encode"] = measure(lambda: (pipe.text_cache.clear(), pipe.encode_prompts(prompts)), repeats)
    latents = result["gen"].latents
    out["vae_decode"] = measure(lambda: pipe.decode(latents), repeats)
    out["sampling"] = out["ours"]["median"] - out["text_encode"]["median"] - out["vae_decode"]["median"]
    if peer:
        ref = peer_pipeline(pipe)
        noise = pack(pipe.initial_noise(seed, 1, size, size))
        dtype = next(pipe.transformer.parameters()).dtype

        def text(p):
            enc = pipe.text_encoder.encode([p])
            return pad_text(enc.embeds.to(dtype), enc.mask)

        def theirs():
            embeds, mask = text(prompt)
            neg, neg_mask = text("")
            result["peer"] = ref(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                                 negative_prompt_attention_mask=neg_mask, height=size, width=size,
                                 num_inference_steps=steps, guidance_scale=cfg, latents=noise.to(dtype),
                                 output_type="pt").images
        out["peer"] = measure(theirs, repeats)
        out["ratio"] = out["peer"]["median"] / out["ours"]["median"]
        ours_px = torch.from_numpy(np.stack([np.asarray(im) for im in result["gen"].images]))
        theirs_px = (result["peer"].float().clamp(0, 1) * 255).round().permute(0, 2, 3, 1)
        out["pixel_mean_abs_diff"] = float((ours_px.float() - theirs_px).abs().mean())
    return out


# --- training -----------------------------------------------------------------------------------------------------

def bench_train(params: MMDiTParams, side: int, visible: int, batch: int, repeats: int = 3, peer: bool = True,
                bf16: bool | None = None) -> dict:
    """Samples/s of one optimizer step on fixed latents and text: our trainer's transformer (pads dropped, bf16
    autocast where this CPU runs bf16 natively: `bf16` None) vs a plain loop on diffusers' model with the same
    config and autocast, text padded to 512."""
    bf16 = fast_bf16("cpu") if bf16 is None else bf16
    torch.manual_seed(0)
    model = build(params).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, side * side, params.in_channels, generator=g)
    target = torch.randn(x.shape, generator=g)
    ids = image_ids(batch, side, side)
    txt, mask = random_text(params, batch, visible)
    txt_ids = torch.zeros(batch, PEER_PAD, 3)
    t = torch.rand(batch, generator=g)

    def step_fn(net, forward):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = forward(net)
            loss = (pred.float() - target).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    out: dict = {"tokens_img": side * side, "tokens_txt": visible, "batch": batch, "bf16": bf16}
    ours = measure(step_fn(model, lambda m: m(x, ids, txt, txt_ids, t, txt_mask=mask)), repeats)
    out["ours"], out["ours_sps"] = ours, batch / ours["median"]
    if peer:
        ref = peer_transformer(model).train()
        joint = torch.cat([mask, torch.ones(batch, side * side, dtype=torch.bool)], 1)
        theirs = measure(step_fn(ref, lambda m: m(hidden_states=x, encoder_hidden_states=txt, timestep=t,
                                                  img_ids=ids[0], txt_ids=txt_ids[0], attention_mask=joint,
                                                  return_dict=False)[0]), repeats)
        out["peer"], out["peer_sps"] = theirs, batch / theirs["median"]
        out["ratio"] = out["ours_sps"] / out["peer_sps"]
    del model
    gc.collect()
    return out


# --- the suite ----------------------------------------------------------------------------------------------------

# the benchmark's larger random-weight config (178M parameters, T5-width text input)
LARGE = MMDiTParams(variant="chroma", context_in_dim=4096, hidden_size=768, num_heads=12, depth=6,
                    depth_single_blocks=12, axes_dim=(8, 28, 28), approximator_hidden=1024, approximator_depth=2)


def run(model: str = "default", quick: bool = False, repeats: int | None = None, peer: bool = True,
        log: Callable[[str], None] = lambda s: None) -> dict:
    """The whole suite as one JSON-able dict (see benchmarks/README.md for the fields)."""
    from .pipeline.loading import load, random_pipeline
    repeats = repeats or (2 if quick else 3)
    report: dict = {"machine": machine_info(), "model": model, "quick": quick}
    log("matmul peak")
    emulated = not fast_bf16("cpu")  # emulated bf16 runs ~0.3 GFLOP/s: one 2048^3 matmul would take a minute
    report["matmul_peak_gflops"] = {
        "fp32": matmul_peak(torch.float32, (512,) if quick else (1024, 2048), 0.3 if quick else 2.0),
        "bf16": matmul_peak(torch.bfloat16, (512,) if quick or emulated else (1024, 2048), 0.3 if quick else 2.0)}

    pipe = random_pipeline("tiny") if quick else load(model)
    dtype = next(pipe.transformer.parameters()).dtype  # MFU against the peak of the dtype the model runs in
    report["dtype"] = str(dtype).removeprefix("torch.")
    peak = report["matmul_peak_gflops"]["bf16" if dtype == torch.bfloat16 else "fp32"]
    size, steps = (64, 4) if quick else (256, 20)
    report["parameters"] = sum(p.numel() for p in pipe.transformer.parameters())
    log("transformer forward")
    side = size // pipe.vae.downsample // 2
    report["transformer"] = bench_transformer(pipe.transformer, side, 16, repeats=repeats, peak_gflops=peak,
                                              peer=peer)
    report["transformer"].update(ours_s=report["transformer"]["ours"]["median"],
                                 peer_s=report["transformer"].get("peer", {}).get("median"))
    log("txt2img")
    report["txt2img"] = bench_txt2img(pipe, "a red circle above a blue square", size, steps, 4.0, repeats, peer)
    report["txt2img"].update(ours_s=report["txt2img"]["ours"]["median"],
                             peer_s=report["txt2img"].get("peer", {}).get("median"))
    log("txt2img, compiled blocks")  # the warm-up call pays the compile
    report["txt2img_compiled"] = bench_txt2img(pipe.compile(), "a red circle above a blue square", size, steps, 4.0,
                                               repeats, peer=False)
    report["txt2img_compiled"]["speedup"] = report["txt2img"]["ours_s"] / report["txt2img_compiled"]["ours"]["median"]
    report["transformer_compiled"] = bench_transformer(pipe.transformer, side, 16, repeats=repeats, peak_gflops=peak,
                                                       peer=False)
    log("training step")
    params = pipe.transformer.params
    report["train"] = bench_train(params, side, 16, batch=4 if quick else 16, repeats=repeats, peer=peer)
    report["peak_rss_mb"] = peak_rss_mb()
    return report


def table(report: dict) -> str:
    """The report as a markdown table: figure, ours, peer, ratio, MFU."""
    def fmt(v, unit=""):
        return "" if v is None else f"{v:.3g}{unit}"
    rows = ["| figure | ours | peer | ratio (peer/ours, train: ours/peer) | MFU |", "|---|---|---|---|---|"]
    peak = report["matmul_peak_gflops"]
    rows.append(f"| matmul peak GFLOP/s (fp32 / bf16) | {peak['fp32']:.0f} / {peak['bf16']:.0f} | | | |")
    tr = report["transformer"]
    rows.append(f"| transformer forward s (batch {tr['batch']}, {tr['tokens_img']} img + {tr['tokens_txt']} txt) | "
                f"{fmt(tr['ours_s'])} | {fmt(tr['peer_s'])} | {fmt(tr.get('ratio'), 'x')} | {fmt(tr.get('mfu'))} |")
    ti = report["txt2img"]
    rows.append(f"| txt2img s ({ti['size']} px, {ti['steps']} steps, cfg {ti['cfg']}) | {fmt(ti['ours_s'])} | "
                f"{fmt(ti['peer_s'])} | {fmt(ti.get('ratio'), 'x')} | |")
    tc, fc = report.get("txt2img_compiled"), report.get("transformer_compiled")
    if tc:
        rows.append(f"| transformer forward s, torch.compile'd blocks | {fmt(fc['ours']['median'])} | | "
                    f"{fmt(tr['ours_s'] / fc['ours']['median'], 'x')} vs eager | {fmt(fc.get('mfu'))} |")
        rows.append(f"| txt2img s, torch.compile'd blocks | {fmt(tc['ours']['median'])} | | "
                    f"{fmt(tc['speedup'], 'x')} vs eager | |")
    rows.append(f"| ... text encode / sampling / VAE decode s | {fmt(ti['text_encode']['median'])} / "
                f"{fmt(ti['sampling'])} / {fmt(ti['vae_decode']['median'])} | | | |")
    tn = report["train"]
    rows.append(f"| training samples/s (batch {tn['batch']}) | {fmt(tn['ours_sps'])} | {fmt(tn.get('peer_sps'))} | "
                f"{fmt(tn.get('ratio'), 'x')} | |")
    rows.append(f"| peak RSS MB | {report['peak_rss_mb']:.0f} | | | |")
    return "\n".join(rows)


def dumps(report: dict) -> str:
    return json.dumps(report, indent=1)


def emit(report: dict, markdown: str, out: str | None = None, json_only: bool = False) -> None:
    """How every benchmark reports: the JSON (also written to `out`), then its markdown table."""
    if out:
        Path(out).write_text(dumps(report) + "\n")
    print(dumps(report))
    if not json_only:
        print(markdown)
