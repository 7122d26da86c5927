"""`chromaflow` command line: generate images, inspect checkpoints and presets."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .models.memory import keep_freed_memory


def _multiple_of_16(text: str) -> int:
    value = int(text)
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"{value} is not a positive multiple of 16 (try {max(16, round(value / 16) * 16)})")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _lora(text: str) -> tuple[str, float]:
    path, sep, strength = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        return path, float(strength)
    except ValueError:
        return text, 1.0  # a colon inside the path, no strength


def _sampler_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)  # numbers and booleans; anything else stays a string
    except json.JSONDecodeError:
        return key, value


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chromaflow", description="Chroma-family text-to-image: generate, train, evaluate, benchmark, inspect.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image, image editing, large images",
                       description="Generate images from a prompt; edit an --image (img2img, --mask inpainting, "
                       "--outpaint); go beyond the native size (--tile, --hires-scale, --attention-window). Unset "
                       "options take the model's defaults (the built-in model: 256x256, 20 steps).")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png",
                   help="PNG path (default out.png); a batch writes NAME-1.png, NAME-2.png, ... after the first")
    g.add_argument("--negative", default="", help="negative prompt (used when --cfg > 1)")
    g.add_argument("--width", type=_multiple_of_16, help="pixels, multiple of 16")
    g.add_argument("--height", type=_multiple_of_16, help="pixels, multiple of 16")
    g.add_argument("--steps", type=_positive, help="sampling steps")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale; 1 disables the negative pass")
    g.add_argument("--seed", type=int, help="image i uses seed + i (default: random)")
    g.add_argument("--batch", type=_positive, default=1, help="number of images")
    g.add_argument("--sampler", help="sampler: euler, euler_ancestral, heun, dpmpp_2m, uni_pc, ... or an A1111 name "
                   "such as 'Euler a' or 'DPM++ 2M Karras' (default: the model's, euler)")
    g.add_argument("--scheduler", help="schedule: simple, normal, sgm_uniform, ddim_uniform, beta, karras, "
                   "exponential, kl_optimal (default: the model's, simple)")
    g.add_argument("--shift", type=float, help="fixed timestep shift; default: Flux's resolution-dependent shift")
    g.add_argument("--cfg-mode", help="how cond and uncond combine: cfg (default), apg, cfg_zero_star")
    g.add_argument("--cfg-rescale", type=float, help="CFG rescale phi in [0, 1] (default 0: off)")
    g.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="apply guidance only for t in [LO, HI] (t = 1 is noise); elsewhere one conditional pass")
    g.add_argument("--apg-eta", type=float, help="APG: weight of the guidance parallel to the prediction (default 1)")
    g.add_argument("--apg-norm-threshold", type=float, help="APG: clip the guidance norm (default 0: off)")
    g.add_argument("--apg-momentum", type=float, help="APG: momentum in (-1, 1) (default 0)")
    g.add_argument("--sampler-option", action="append", default=[], metavar="KEY=VALUE", type=_sampler_option,
                   help="a sampler keyword, repeatable: eta=0.5, s_noise=1.0, order=2, variant=bh2, ...")
    g.add_argument("--cache", choices=["fbc", "teacache"],
                   help="step caching: skip most of the transformer on steps whose input barely changed "
                   "(fbc: First Block Cache; teacache: TeaCache)")
    g.add_argument("--cache-threshold", type=float,
                   help="relative change under which a step reuses the cache (defaults: fbc 0.12, teacache 0.3); "
                   "higher is faster and less faithful")
    g.add_argument("--cache-start", type=float, default=0.2, metavar="FRACTION",
                   help="run this first fraction of the steps in full (they decide the composition); default 0.2")
    g.add_argument("--cache-max-skips", type=int, metavar="N", help="reuse the cache at most N steps in a row")
    m = g.add_argument_group("editing", "img2img, inpainting and outpainting of an input image (README: Edit)")
    m.add_argument("--image", help="input image: img2img, or inpainting with --mask, or outpainting with --outpaint")
    m.add_argument("--mask", help="mask image, white = repaint; grays are differential diffusion (repainted later)")
    m.add_argument("--strength", type=float, help="in [0, 1]: the last ceil(strength x steps) steps run (0 keeps "
                   "the image, 1 ignores it; default 0.75, with a mask 1); settings report the start t")
    m.add_argument("--mask-blur", type=float, default=0.0, help="feather the mask: Gaussian sigma in pixels")
    m.add_argument("--outpaint", type=int, nargs=4, metavar=("LEFT", "TOP", "RIGHT", "BOTTOM"),
                   help="pad the image by these pixels and generate the padding (rounded up to multiples of 16)")
    m.add_argument("--outpaint-fill", default="edge", choices=["edge", "reflect", "gray"],
                   help="what the padding starts from (default edge)")
    m.add_argument("--outpaint-decay", type=float, default=0.5,
                   help="k of the keep-weight exp(-d / (k * max_pad)) at distance d from the image (default 0.5)")
    r = g.add_argument_group("large images", "beyond the native size (README: Large images)")
    r.add_argument("--tile", type=_multiple_of_16, help="MultiDiffusion: denoise windows of this many pixels "
                   "(the model's native size is a good choice) and average them")
    r.add_argument("--tile-stride", type=int, help="pixels between windows, a multiple of 8 (default half a tile)")
    r.add_argument("--region", nargs=2, action="append", default=[], metavar=("PROMPT", "MASK"),
                   help="a region prompt and its mask image (white = the region), repeatable")
    r.add_argument("--hires-scale", type=float, help="hires fix: generate, upscale by this factor, re-denoise")
    r.add_argument("--hires-upscale", default="latent", choices=["latent", "pixel"], help="upscale the latents "
                   "(default) or the decoded image")
    r.add_argument("--hires-strength", type=float, default=0.5, help="strength of the re-denoise (default 0.5)")
    r.add_argument("--hires-steps", type=_positive, help="steps of the re-denoise (default --steps)")
    r.add_argument("--rope-scaling", choices=["interpolate", "ntk"],
                   help="positions for grids beyond the native size: interpolate or NTK-scale RoPE")
    r.add_argument("--attention-window", type=_multiple_of_16, help="shifted-window attention over image "
                   "tokens, windows of this many pixels (text stays global): cost linear in pixels")
    r.add_argument("--attention-window-steps", type=float, default=1.0,
                   help="fraction of the steps (the first ones) that use windows (default 1)")
    r.add_argument("--attention-window-blocks", type=float, default=1.0,
                   help="fraction of the transformer blocks (the first ones) that use windows (default 1)")
    r.add_argument("--vae-tile", type=int, help="VAE encode / decode in tiles of this many pixels (a multiple of "
                   "8): memory bounded by the tile")
    g.add_argument("--model", default="default", help="built-in name (default, tiny) or a model folder / file path")
    g.add_argument("--lora", action="append", default=[], type=_lora, metavar="PATH[:STRENGTH]",
                   help="a LoRA file (kohya, diffusers/PEFT or original naming) and its strength (default 1); "
                   "repeatable")
    g.add_argument("--lora-mode", default="auto", choices=["auto", "merge", "runtime"],
                   help="merge LoRAs into the weights, or add them at runtime (auto: merge unless quantized)")
    g.add_argument("--quantize", metavar="TYPE",
                   help="quantize the transformer while loading: Q8_0, Q4_K, ... (GGUF types), int8, fp8 or nf4")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer blocks: a one-off compile of 10-30 s, then 1.05-1.08x faster "
                        "sampling as measured here (benchmarks/README.md); for many images or long runs")
    g.add_argument("--text-encoder", help="text encoder folder, when --model is a bare transformer file")
    g.add_argument("--vae", help="VAE folder or file, when --model is a bare transformer file")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="train a model (the built-in one: --preset default)",
                       description="Rectified-flow training. A preset or a JSON config; resumes "
                       "from the newest checkpoint in the output folder unless --restart. Ctrl-C saves and exits; so "
                       "does --hours, for training across several sittings.")
    t.add_argument("config", nargs="?", help="JSON training config")
    t.add_argument("--preset", help="a built-in recipe: default (the built-in model), quick (its one-hour version), "
                   "v4 (the candidate for the next built-in model), v2 (the built-in model before default), "
                   "tiny (seconds, for tests)")
    t.add_argument("--out", help="output folder (default runs/NAME)")
    t.add_argument("--restart", action="store_true", help="ignore existing checkpoints and start over")
    t.add_argument("--hours", type=float, help="save a checkpoint and exit after this many hours of transformer "
                   "training; the same command continues from there")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="score a model on the compositional benchmark",
                       description="GenEval-style accuracy (colour, shape, size, count, relation, all-correct) on "
                       "held-out shapes-world prompts in English, Chinese and Russian; writes JSON, markdown, a grid.")
    e.add_argument("--model", default="default", help="built-in name or model folder")
    e.add_argument("--n", type=_positive, default=50, help="prompts per category and language")
    e.add_argument("--steps", type=_positive, help="sampling steps (default: the model's)")
    e.add_argument("--cfg", type=float, help="guidance scale (default: the model's)")
    e.add_argument("--sampler", help="sampler (default: the model's)")
    e.add_argument("--scheduler", help="schedule (default: the model's)")
    e.add_argument("--shift", type=float, help="timestep shift (default: the model's)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--ground-truth", action="store_true", help="score exact renders instead (the detector's ceiling)")
    e.add_argument("--out", default="eval", help="output folder (report.json, report.md, grid.png)")

    i = sub.add_parser("info", help="describe a checkpoint or a preset",
                       description="Layout, architecture, parameter count, dtypes and metadata of a checkpoint.")
    i.add_argument("path", nargs="?", help="safetensors or GGUF file, sharded index, LoRA, or model folder")
    i.add_argument("--preset", help="describe a preset instead (built on the meta device, no memory)")
    i.add_argument("--json", action="store_true", help="print one JSON object")

    c = sub.add_parser("convert", help="convert a checkpoint or a LoRA to another format",
                       description="Transformers: original | diffusers (safetensors), gguf:TYPE (F32, F16, BF16, "
                       "Q8_0, Q6_K, Q5_K, Q5_1, Q5_0, Q4_K, Q4_1, Q4_0), fp8 (ComfyUI scaled), int8, nf4 "
                       "(bitsandbytes), from any of these. LoRAs: kohya | diffusers.")
    c.add_argument("input", help="checkpoint file or folder, GGUF, or LoRA")
    c.add_argument("output", help="output file (.safetensors / .gguf), or a folder for --to diffusers")
    c.add_argument("--to", required=True, help="target format (see above)")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of unquantized tensors (default: the source's; bfloat16 from quantized sources)")
    c.add_argument("--title", help="ModelSpec title (default: the source's, else the output name)")
    c.add_argument("--resolution", help="ModelSpec resolution, e.g. 1024x1024")
    c.add_argument("--base", default="chroma",
                   help="LoRAs: the model they belong to, a preset (chroma, flux-dev, ...) or a checkpoint")

    b = sub.add_parser("bench", help="benchmark against diffusers on the same weights",
                       description="Matmul peak, transformer forward (with MFU), end-to-end txt2img and training "
                       "samples/s, each side by side with diffusers' Chroma implementation holding the same weights; "
                       "min/median/max over repeats. Use the machine otherwise idle: figures are ratios, but a busy "
                       "CPU still skews them.")
    b.add_argument("--model", default="default", help="built-in model name or model folder (default: default)")
    b.add_argument("--quick", action="store_true", help="tiny random model and sizes: a smoke run of seconds")
    b.add_argument("--repeats", type=_positive, help="timed runs per figure after one warm-up (default 3; quick 2)")
    b.add_argument("--no-peer", action="store_true", help="skip diffusers (ours only)")
    b.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    b.add_argument("--out", help="also write the JSON report to this file")

    s = sub.add_parser("serve", help="serve ComfyUI- and A1111-compatible APIs and a web page",
                       description="An HTTP server that ComfyUI API clients (POST /prompt, /ws, /history, /view) and "
                       "A1111/Forge API clients (/sdapi/v1/txt2img, img2img, progress, options) drive unchanged, "
                       "plus a web page at /. One worker runs jobs in order; the model loads before the first "
                       "request. Files live in DIR/output, input, temp and models (models/diffusion_models, "
                       "text_encoders, vae, loras, checkpoints).")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1); another address needs --token or --allow-remote")
    s.add_argument("--port", type=int, default=8188, help="port (default 8188, ComfyUI's; A1111 clients: any)")
    s.add_argument("--model", default="default", help="built-in model name or model folder to serve (default: default)")
    s.add_argument("--token", help="require 'Authorization: Bearer TOKEN' or ?token=TOKEN on every route")
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host without --token")
    s.add_argument("--dir", default=".", help="folder holding output/, input/, temp/, models/ (default: .)")
    s.add_argument("--max-queue", type=_positive, default=100, help="pending jobs before new ones get 503 (default 100)")
    s.add_argument("--max-pixels", type=_positive, default=2048 * 2048,
                   help="largest width x height x batch of one job (default 4194304)")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default 20)")
    return ap


def cmd_serve(args) -> int:
    try:
        from .server import ServerConfig, serve
    except ImportError as e:
        raise ValueError(f"the server needs its extra: pip install 'chromaflow[serve]' ({e})") from None
    serve(ServerConfig(host=args.host, port=args.port, model=args.model, token=args.token,
                       allow_remote=args.allow_remote, base_dir=args.dir, max_queue=args.max_queue,
                       max_pixels=args.max_pixels, max_upload_mb=args.max_upload_mb))
    return 0


def cmd_bench(args) -> int:
    from . import benchmark
    log = (lambda s: None) if args.json else (lambda s: print(f"... {s}", file=sys.stderr))
    report = benchmark.run(args.model, quick=args.quick, repeats=args.repeats, peer=not args.no_peer, log=log)
    if args.out:
        Path(args.out).write_text(benchmark.dumps(report))
    print(benchmark.dumps(report) if args.json else benchmark.table(report))
    return 0


def _open_image(path: str, what: str):
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            return image.copy()
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file; check the path") from None
    except UnidentifiedImageError:
        raise ValueError(f"{what} {path}: not an image file") from None


def _mode_options(args) -> dict:
    """The editing / large-image options of `generate`, as pipeline keywords."""
    if args.mask and not args.image:
        raise ValueError("--mask needs --image (the image to inpaint)")
    if (args.strength is not None or args.outpaint) and not args.image:
        raise ValueError("--strength and --outpaint edit an input image: add --image FILE")
    return dict(image=args.image and _open_image(args.image, "--image"),
                mask=args.mask and _open_image(args.mask, "--mask"), strength=args.strength,
                mask_blur=args.mask_blur, outpaint=args.outpaint, outpaint_fill=args.outpaint_fill,
                outpaint_decay=args.outpaint_decay, tile=args.tile, tile_stride=args.tile_stride,
                regions=[(prompt, _open_image(mask, "--region mask")) for prompt, mask in args.region],
                hires_scale=args.hires_scale, hires_upscale=args.hires_upscale, hires_strength=args.hires_strength,
                hires_steps=args.hires_steps, rope_scaling=args.rope_scaling, attention_window=args.attention_window,
                attention_window_steps=args.attention_window_steps,
                attention_window_blocks=args.attention_window_blocks, vae_tile=args.vae_tile)


def cmd_generate(args) -> int:
    from .pipeline.loading import load
    from .formats.png import save_png

    pipe = load(args.model, text_encoder=args.text_encoder, vae=args.vae, quantize=args.quantize, loras=args.lora,
                lora_mode=args.lora_mode, compile=args.compile)
    result = pipe(args.prompt, negative_prompt=args.negative, width=args.width, height=args.height, steps=args.steps,
                  cfg=args.cfg, seed=args.seed, batch_size=args.batch, sampler=args.sampler,
                  scheduler=args.scheduler, shift=args.shift, cfg_mode=args.cfg_mode, cfg_rescale=args.cfg_rescale,
                  cfg_interval=args.cfg_interval, apg_eta=args.apg_eta, apg_norm_threshold=args.apg_norm_threshold,
                  apg_momentum=args.apg_momentum, sampler_options=dict(args.sampler_option), cache=args.cache,
                  cache_threshold=args.cache_threshold, cache_start=args.cache_start,
                  cache_max_skips=args.cache_max_skips, progress=not args.quiet, **_mode_options(args))
    out = Path(args.output)
    for n, image in enumerate(result.images):
        path = out if n == 0 else out.with_name(f"{out.stem}-{n}{out.suffix or '.png'}")
        save_png(image, path, result.settings, index=n)
        print(path)
    return 0


def cmd_train(args) -> int:
    from .pipeline.training import run
    if bool(args.config) == bool(args.preset):
        raise ValueError("give either a CONFIG file or --preset NAME")
    if args.hours is not None and args.hours <= 0:
        raise ValueError(f"--hours must be positive, got {args.hours}")
    folder = run(args.config or args.preset, args.out, resume=not args.restart, progress=not args.quiet,
                 time_limit=None if args.hours is None else 3600 * args.hours)
    print(folder if folder else "stopped before the end; run the same command again to resume")
    return 0


def cmd_eval(args) -> int:
    from .engine import evaluate as bench
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.ground_truth:
        report = bench.evaluate_ground_truth(bench.benchmark_prompts(args.n, seed=args.seed),
                                             grid_path=str(out / "grid.png"))
    else:
        from .pipeline.loading import load
        from .pipeline.training import evaluate_pipeline
        chosen = dict(steps=args.steps, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler, shift=args.shift)
        settings = {k: v for k, v in chosen.items() if v is not None}
        report = evaluate_pipeline(load(args.model), args.n, seed=args.seed, grid_path=str(out / "grid.png"),
                                   progress=True, **settings)
    table = bench.markdown_table(report)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out / "report.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'grid.png'}")
    return 0


def cmd_convert(args) -> int:
    import torch
    from .formats.convert import convert_checkpoint, convert_lora, is_lora
    if is_lora(args.input):
        path = convert_lora(args.input, args.output, args.to, base=args.base)
    else:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        path = convert_checkpoint(args.input, args.output, args.to, dtype=dtype, title=args.title,
                                  resolution=args.resolution)
    print(path)
    return 0


def cmd_info(args) -> int:
    if args.preset:
        from .models.transformer import build, count_parameters, preset
        params = preset(args.preset)
        model = build(params, device="meta")
        report = {"preset": args.preset, "architecture": params.variant, "parameters": count_parameters(model),
                  "tensors": len(model.state_dict()), "params": params.to_dict()}
    elif args.path:
        from .formats.inspect import describe
        report = describe(args.path)
    else:
        raise ValueError("give a checkpoint path or --preset NAME")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for key, value in report.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
            elif isinstance(value, int):
                value = f"{value:,}"
            print(f"{key:>13}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    keep_freed_memory()  # a CLI process runs one job: reusing freed blocks beats returning them (models.memory)
    try:
        commands = {"generate": cmd_generate, "train": cmd_train, "eval": cmd_eval, "info": cmd_info,
                    "convert": cmd_convert, "bench": cmd_bench, "serve": cmd_serve}
        return commands[args.command](args)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"chromaflow {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chromaflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
