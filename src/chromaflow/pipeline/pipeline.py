"""Text-to-image pipeline: prompt -> text encoding -> sampled latents -> VAE decode -> PIL images.

It composes the layers below and nothing else: the transformer predicts velocity, `engine.sampling` owns the
schedule / sampler / CFG, the VAE maps latents to pixels. The modes (edit.py: img2img, inpaint, outpaint;
tiles.py: MultiDiffusion; hires.py: hires fix, RoPE scaling, windowed attention) run through the same one
sampling pass, `Pipeline._sample`: they choose its start latents and start time, and wrap its denoiser.
"""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..engine import sampling
from ..models.text import TextEncoding, chroma_mask
from ..models.step_cache import StepCache
from ..models.transformer import MMDiT, image_ids
from ..models.vae import VAE, pack, unpack
from . import edit, hires, tiles
from .denoise import packed
from .hires import HighRes

VERSION = "chromaflow 0.1.0"


# defaults per step-cache method, and the share of steps that always run in full (benchmarks/caching.py: FBC 0.12
# from 20% of the steps saved 1.54x of the passes on the built-in model for no accuracy lost)
CACHE_THRESHOLDS = {"fbc": 0.12, "teacache": 0.3}
CACHE_START = 0.2


class Interrupted(Exception):
    """Raised inside sampling to stop early; the pipeline returns the current estimate."""


@dataclass
class StepInfo:
    step: int  # 0-based index of the step just evaluated
    steps: int
    t: float
    latents: Tensor  # current noisy latents (B, C, h, w)
    x0: Tensor  # the model's current estimate of the clean latents (B, C, h, w)


@dataclass
class Generation:
    images: list[Image.Image]
    settings: dict  # everything needed to reproduce the images, with resolved defaults
    latents: Tensor = field(repr=False, default=None)

    @property
    def image(self) -> Image.Image:
        return self.images[0]


@dataclass
class Defaults:
    width: int = 1024
    height: int = 1024
    steps: int = 26
    cfg: float = 4.0
    sampler: str = "euler"
    scheduler: str = "simple"
    shift: float | None = None  # None: Flux's resolution-dependent shift


def latents_to_pil(images: Tensor) -> list[Image.Image]:
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


class Pipeline:
    def __init__(self, transformer: MMDiT, text_encoder, vae: VAE, name: str = "model", model_hash: str = "",
                 defaults: Defaults | None = None, device: str | torch.device = "cpu"):
        if transformer.params.variant != "chroma":
            raise ValueError(f"{name}: a {transformer.params.variant} transformer needs a CLIP pooled vector, which "
                             "this pipeline does not provide yet; it generates with Chroma-variant models")
        self.transformer = transformer.eval()
        self.text_encoder = text_encoder
        self.vae = vae.eval()
        self.name, self.model_hash = name, model_hash
        self.defaults = defaults or Defaults()
        self.device = torch.device(device)
        self.text_cache: dict[str, Tensor] = {}  # prompt -> its visible text embeddings, oldest first
        self.text_cache_size = 64  # prompts kept; clear text_cache after changing the text encoder's weights

    def compile(self, mode: str | None = None) -> "Pipeline":
        """torch.compile the transformer's blocks in place (MMDiT.compile_blocks)."""
        self.transformer.compile_blocks(mode)
        return self

    # pieces --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextEncoding:
        """Encode each distinct prompt once; rows come back in the order given, with Chroma's one-pad mask."""
        unique = list(dict.fromkeys(prompts))
        new = [p for p in unique if p not in self.text_cache]
        if new:
            enc = self.text_encoder.encode(new)
            for i, p in enumerate(new):  # each prompt's visible tokens (real + one pad) alone, for any batch later
                mask = chroma_mask(enc.mask[i:i + 1])[0]
                self.text_cache[p] = enc.embeds[i][mask]
        rows = [self.text_cache[p] for p in prompts]
        for p in unique:  # least recently used first, so eviction never drops a prompt of this call
            self.text_cache[p] = self.text_cache.pop(p)
        while len(self.text_cache) > max(self.text_cache_size, len(unique)):
            self.text_cache.pop(next(iter(self.text_cache)))
        length = max(len(r) for r in rows)
        embeds = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, length - len(r))) for r in rows])
        mask = torch.arange(length)[None] < torch.tensor([len(r) for r in rows])[:, None]
        return TextEncoding(embeds.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def decode(self, latents: Tensor, tile: int | None = None) -> list[Image.Image]:
        """Latents -> images; `tile` (pixels) decodes tile by tile (models.vae)."""
        return latents_to_pil(self.vae.decode(latents.to(next(self.vae.parameters()).dtype), tile=tile))

    def initial_noise(self, seed: int, batch_size: int, height: int, width: int,
                      generators: list[torch.Generator] | None = None) -> Tensor:
        """Image i gets noise from its own CPU generator seeded seed + i: reproducible alone and in a batch.
        Pass `generators` to keep drawing from them afterwards (stochastic samplers continue each image's stream)."""
        down = self.vae.downsample
        shape = (self.vae.latent_channels, height // down, width // down)
        generators = generators or [torch.Generator().manual_seed(seed + i) for i in range(batch_size)]
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

    # the call ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", width: int | None = None,
                 height: int | None = None, steps: int | None = None, cfg: float | None = None,
                 seed: int | None = None, batch_size: int = 1,
                 sampler: str | None = None, scheduler: str | None = None, shift: float | None = None,
                 cfg_mode: str | None = None, cfg_rescale: float | None = None,
                 cfg_interval: tuple[float, float] | None = None, apg_eta: float | None = None,
                 apg_norm_threshold: float | None = None, apg_momentum: float | None = None,
                 sampler_options: dict | None = None, cache: str | None = None, cache_threshold: float | None = None,
                 cache_start: float = CACHE_START, cache_max_skips: int | None = None,
                 image=None, mask=None, strength: float | None = None, mask_blur: float = 0.0,
                 outpaint: tuple[int, int, int, int] | None = None, outpaint_fill: str = "edge",
                 outpaint_decay: float = 0.5, tile: int | None = None, tile_stride: int | None = None,
                 tile_batch: int = 4, regions: list[tuple[str, object]] | None = None, vae_tile: int | None = None,
                 hires_scale: float | None = None, hires_upscale: str = "latent", hires_strength: float = 0.5,
                 hires_steps: int | None = None, rope_scaling: str | None = None,
                 attention_window: int | None = None, attention_window_steps: float = 1.0,
                 attention_window_blocks: float = 1.0,
                 callback: Callable[[StepInfo], bool | None] | None = None, progress: bool = True) -> Generation:
        """Generate `batch_size` images per prompt (a list of prompts runs as one batch; image i uses seed + i).

        `sampler` / `scheduler` take our (ComfyUI) names or A1111 ones ("DPM++ 2M Karras" sets both); the cfg_* and
        apg_* options are engine.guidance's; `sampler_options` are the sampler's own keywords (eta, s_noise, order).
        Unset options take the model's defaults (samplers and guidance: their own). `cache` ("fbc" First Block
        Cache, "teacache") skips most of the transformer on steps whose input barely changed (models.step_cache);
        the first `cache_start` fraction of the steps always runs in full, and `cache_max_skips` caps reuses in a
        row; settings["cache"] then reports how many calls ran in full.
        `callback(StepInfo)` runs after every step; returning False interrupts, and the images are then
        decoded from the latest clean estimate (settings["interrupted"]).

        Modes, all on the same sampler (each module's docstring has the details):
        - edit.py: `image` (PIL image, uint8 array or tensor) -> img2img from `strength` (default 0.75; with a
          mask 1.0); `mask` (white = repaint; soft values = differential diffusion) feathered by `mask_blur`;
          `outpaint=(left, top, right, bottom)` pixels with `outpaint_fill` and `outpaint_decay`.
        - tiles.py: `tile` (window pixels) / `tile_stride` -> MultiDiffusion over windows, `tile_batch` windows
          per model call; `regions=[(prompt, mask), ...]` region prompts.
        - hires.py: `hires_scale` with `hires_upscale`, `hires_strength`, `hires_steps` -> hires fix;
          `rope_scaling` ("interpolate" | "ntk"), `attention_window` (pixels) with `attention_window_steps` /
          `attention_window_blocks` (fractions) for sizes beyond the native one.
        - `vae_tile` (pixels): tiled VAE encode / decode for large images.
        Adjustments made to the request (rounded sizes, clamped windows) are listed in settings["adjustments"]."""
        d = self.defaults
        pick = lambda value, default: default if value is None else value
        modes, notes = {}, []  # settings of the modes used (a plain generation's settings stay as they were)
        canvas = None
        if image is not None:
            canvas = edit.prepare(image, mask, width, height, outpaint, outpaint_fill, outpaint_decay, mask_blur)
            width, height, notes = canvas.width, canvas.height, canvas.notes
            strength = pick(strength, 1.0 if canvas.sample_mask is not None else 0.75)
            modes.update(mode="outpaint" if outpaint else "inpaint" if mask is not None else "img2img",
                         strength=strength, **({"mask_blur": mask_blur} if canvas.sample_mask is not None else {}))
            modes.update(dict(outpaint=list(canvas.padding), outpaint_fill=outpaint_fill,
                              outpaint_decay=outpaint_decay) if outpaint else {})
        elif mask is not None or outpaint is not None or strength is not None:
            raise ValueError("mask, outpaint and strength edit an input image: pass image=...")
        width, height, steps, cfg = pick(width, d.width), pick(height, d.height), pick(steps, d.steps), pick(cfg, d.cfg)
        sampler, named_scheduler = sampling.resolve_sampler(pick(sampler, d.sampler))
        scheduler = sampling.resolve_scheduler(scheduler) if scheduler is not None else None
        scheduler = scheduler or named_scheduler or sampling.resolve_scheduler(d.scheduler) or "simple"
        seed = random.randrange(2**32) if seed is None else int(seed)
        validate(width=width, height=height, steps=steps, batch_size=batch_size, cfg=cfg)
        if not 0 <= cache_start <= 1:
            raise ValueError(f"cache_start is a fraction of the steps in [0, 1], got {cache_start}")
        options = {k: v for k, v in dict(cfg_mode=cfg_mode, cfg_rescale=cfg_rescale, cfg_interval=cfg_interval,
                                         apg_eta=apg_eta, apg_norm_threshold=apg_norm_threshold,
                                         apg_momentum=apg_momentum).items() if v is not None}
        guidance = sampling.Guidance(cfg=cfg, **options)
        uses_uncond = cfg != 1 or sampling.SAMPLERS[sampler].needs_uncond
        start = 0 if canvas is None else edit.start_index(strength, steps)  # (validates strength)
        if hires_scale is not None:
            hires_steps = pick(hires_steps, steps)
            target = _hires_target(width, height, hires_scale, hires_upscale, canvas is not None, notes)
            modes.update(hires_scale=hires_scale, hires_upscale=hires_upscale, hires_strength=hires_strength,
                         hires_steps=hires_steps, hires_size=list(target))
            hires_start = edit.start_index(hires_strength, hires_steps)
        tile, tile_stride = _tiling(tile, tile_stride, tile_batch, width, height, notes)
        modes.update(dict(tile=tile, tile_stride=tile_stride) if tile else {})
        highres = self._highres(rope_scaling, attention_window, attention_window_steps, attention_window_blocks)
        if attention_window is not None and attention_window >= max(width, height) and hires_scale is None:
            notes.append(f"attention_window {attention_window} covers the {width}x{height} canvas: full attention")
        modes.update({"rope_scaling": rope_scaling} if rope_scaling else {})
        modes.update(dict(attention_window=attention_window, attention_window_steps=attention_window_steps,
                          attention_window_blocks=attention_window_blocks) if attention_window else {})
        modes.update({"vae_tile": vae_tile} if vae_tile else {})
        for note in notes:
            warnings.warn(note, stacklevel=3)  # the caller of pipe(...), past no_grad's wrapper

        prompts = [p for p in ([prompt] if isinstance(prompt, str) else prompt) for _ in range(batch_size)]
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else \
            [p for p in negative_prompt for _ in range(batch_size)]
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives) // batch_size} negative prompts for {len(prompts) // batch_size} "
                             "prompts; give one negative prompt, or one per prompt")
        n = len(prompts)
        output_size = canvas.size if canvas is not None else (width, height)
        region_masks = [np.pad(edit.to_mask(m, output_size, f"region mask {i + 1}"),  # on the (padded) canvas
                               ((0, height - output_size[1]), (0, width - output_size[0])))
                        for i, (_, m) in enumerate(regions or [])]
        modes.update({"regions": [p for p, _ in regions]} if regions else {})
        texts = [self.encode_prompts(rows + (negatives if uses_uncond else []))
                 for rows in [prompts] + [[p] * n for p, _ in regions or []]]
        run = _Run(images=n, texts=texts, regions=region_masks, guidance=guidance, sampler=sampler,
                   sampler_options=dict(sampler_options or {}), scheduler=scheduler, shift=pick(shift, d.shift),
                   cache=cache, cache_threshold=cache_threshold, cache_start=cache_start,
                   cache_max_skips=cache_max_skips, tile=tile, tile_stride=tile_stride,
                   tile_batch=tile_batch, highres=highres, callback=callback, progress=progress,
                   generators=[torch.Generator().manual_seed(seed + i) for i in range(n)])

        noise = self.initial_noise(seed, n, height, width, run.generators)
        sigmas = self._schedule(run, steps, *noise.shape[-2:])[start:]
        run.total_steps = len(sigmas) - 1
        if hires_scale is not None:
            down = self.vae.downsample
            hires_sigmas = self._schedule(run, hires_steps, target[1] // down, target[0] // down)[hires_start:]
            run.total_steps += len(hires_sigmas) - 1
            modes["hires_shift"] = round(run.shifts[1], 4)
        init = mask_latents = None
        if canvas is not None:
            modes["t_start"] = round(float(sigmas[0]), 4)
            init = self.vae.encode(canvas.tensor(), tile=vae_tile).float().to(self.device).expand(n, -1, -1, -1)
            if canvas.sample_mask is not None:
                mask_latents = edit.latent_mask(canvas.sample_mask, self.vae.downsample, self.device)
        latents, interrupted = self._sample(run, noise, sigmas, init, mask_latents)
        if hires_scale is not None and not interrupted:
            upscaled = hires.upscale(latents, (target[1] // down, target[0] // down), hires_upscale, self.vae,
                                     vae_tile)
            hires_noise = self.initial_noise(seed, n, target[1], target[0], run.generators)
            latents, interrupted = self._sample(run, hires_noise, hires_sigmas, upscaled, None)

        images = self.decode(latents, vae_tile)
        if canvas is not None:
            images = canvas.composite(images)
        settings = dict(prompt=prompt, negative_prompt=negative_prompt, width=output_size[0],
                        height=output_size[1], steps=steps, cfg=cfg, seed=seed, batch_size=batch_size,
                        sampler=sampler, scheduler=scheduler, shift=round(run.shifts[0], 4), **guidance.changed(),
                        **({"sampler_options": run.sampler_options} if run.sampler_options else {}),
                        **({"cache": _cache_stats(run.caches)} if run.caches else {}),
                        **modes, model=self.name, model_hash=self.model_hash, version=VERSION)
        if notes:
            settings["adjustments"] = notes
        if interrupted:
            settings["interrupted"] = True
        return Generation(images, settings, latents)

    # the sampling pass every mode shares ---------------------------------------------------------------------
    def _schedule(self, run: _Run, steps: int, h: int, w: int) -> Tensor:
        """The full schedule for an h x w latent; the resolution shift counts the tokens the model sees at once
        (a MultiDiffusion window's, else the canvas's)."""
        if run.tile is not None:
            h, w = min(h, run.tile // self.vae.downsample), min(w, run.tile // self.vae.downsample)
        run.shifts.append(sampling.resolve_shift(run.shift, (h // 2) * (w // 2)))
        return sampling.schedule(steps, run.scheduler, run.shifts[-1]).to(self.device)

    def _sample(self, run: _Run, noise: Tensor, sigmas: Tensor, init: Tensor | None,
                mask: Tensor | None) -> tuple[Tensor, bool]:
        """Sample from sigmas[0] down to 0 -> (latents, interrupted). The start is pure noise, or `init` noised
        to sigmas[0]; with `mask`, inpainting's blend wraps the denoiser."""
        _, _, h, w = noise.shape
        t0 = sigmas[0]
        # a schedule may start below t = 1 (ddim_uniform, img2img): x_t0 = t0 eps + (1 - t0) x0
        x = noise * t0 if init is None else edit.noised(init, noise, t0)
        denoise = self._denoiser(run, h, w, sigmas)
        if mask is not None:
            denoise = edit.inpaint(denoise, mask, init, noise, float(t0))
        offset, last = run.steps_done, {"x0": None}

        def on_step(i, t, x_, x0):
            last["x0"] = x0
            run.steps_done = offset + i + 1
            info = StepInfo(offset + i, run.total_steps, t, unpack(x_, h, w), unpack(x0, h, w))
            if run.callback is not None and run.callback(info) is False:
                raise Interrupted

        try:
            x = sampling.sample(run.sampler, packed(denoise, h, w), pack(x), sigmas, on_step, run.progress,
                                generator=run.generators, **run.sampler_options)
        except Interrupted:
            return unpack(last["x0"], h, w), True
        return unpack(x, h, w), False

    def _denoiser(self, run: _Run, h: int, w: int, sigmas: Tensor):
        """The guided model as a denoiser of h x w latents: one call over the canvas, or MultiDiffusion over
        windows and region prompts."""
        window_until = run.highres.window_until(sigmas)
        steps = len(sigmas) - 1
        cache_from = float(sigmas[min(steps, math.ceil(run.cache_start * steps))])  # t from which reuse is allowed

        def make(prompt_index: int, copies: int) -> sampling.GuidedDenoiser:
            step_cache = None
            if run.cache is not None:
                threshold = CACHE_THRESHOLDS.get(run.cache, 0.1) if run.cache_threshold is None else run.cache_threshold
                # one per window batch: it compares like with like
                step_cache = StepCache(run.cache, threshold, run.cache_max_skips)
                run.caches.append(step_cache)
            velocity = self._velocity(run.texts[prompt_index], run.images, copies, step_cache, run.highres,
                                      window_until, cache_from)
            return sampling.GuidedDenoiser(velocity, run.guidance)

        if run.tile is None and not run.regions:
            return make(0, 1)
        down = self.vae.downsample
        size = (h, w) if run.tile is None else (min(h, run.tile // down), min(w, run.tile // down))
        stride = size if run.tile_stride is None else (run.tile_stride // down,) * 2
        views = tiles.windows(h, w, size, stride)
        weights = [F.interpolate(torch.from_numpy(m)[None, None], size=(h, w), mode="area").to(self.device)
                   for m in run.regions]
        background = (1 - sum(weights)).clamp(min=0) if weights else torch.ones(1, 1, h, w, device=self.device)
        return tiles.multidiffusion(make, views, [background] + weights, run.tile_batch)

    def _velocity(self, text: TextEncoding, images: int, copies: int, step_cache: StepCache | None,
                  highres: HighRes, window_until: float, cache_from: float) -> Callable[[Tensor, Tensor], Tensor]:
        """velocity(x, t) for spatial latents whose rows are `copies` stacks of the `images` rows (window-major),
        all cond, or cond then uncond as GuidedDenoiser batches them."""
        n = images  # text rows: n cond, then n uncond if guidance needs them; each part stacked `copies` times
        embeds, mask = (torch.cat([part.repeat(copies, *[1] * (part.ndim - 1)) for part in (rows[:n], rows[n:])])
                        for rows in (text.embeds, text.mask))
        txt_ids = torch.zeros(*mask.shape, 3, device=self.device)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            rows, _, h, w = x.shape
            if step_cache is not None:
                step_cache.allow_skip = float(t) <= cache_from
            out = self.transformer(pack(x), image_ids(rows, h // 2, w // 2, self.device), embeds[:rows],
                                   txt_ids[:rows], t.expand(rows), txt_mask=mask[:rows], cache=step_cache,
                                   **highres.model_options(h // 2, w // 2, t, window_until))
            return unpack(out, h, w)
        return velocity

    def _highres(self, rope_scaling, attention_window, window_steps, window_blocks) -> HighRes:
        tokens = lambda px: px // (2 * self.vae.downsample)  # noqa: E731
        native = (tokens(self.defaults.height), tokens(self.defaults.width))
        window = None
        if attention_window is not None:
            if attention_window < 16 or attention_window % 16:
                raise ValueError(f"attention_window must be a positive multiple of 16 pixels, got {attention_window}")
            window = (tokens(attention_window),) * 2
        if not 0 <= window_blocks <= 1:
            raise ValueError(f"attention_window_blocks is a fraction of the blocks in [0, 1], got {window_blocks}")
        p = self.transformer.params
        if rope_scaling is not None and p.position_grid:
            raise ValueError(f"rope_scaling {rope_scaling!r} does not apply to this model: its positions already "
                             f"scale with the image size (position_grid {p.position_grid}); leave rope_scaling unset")
        return HighRes(native, rope_scaling, window, round(window_blocks * (p.depth + p.depth_single_blocks)),
                       window_steps)


@dataclass
class _Run:
    """One call's resolved settings and state, shared by its sampling passes (the hires fix makes two)."""
    images: int  # batch rows
    texts: list[TextEncoding]  # per prompt: the main one, then each region's; rows [cond; uncond]
    regions: list[np.ndarray]  # region masks on the canvas
    generators: list[torch.Generator]
    guidance: sampling.Guidance
    sampler: str
    scheduler: str
    shift: float | None
    sampler_options: dict
    cache: str | None
    cache_threshold: float | None
    cache_start: float
    cache_max_skips: int | None
    tile: int | None
    tile_stride: int | None
    tile_batch: int
    highres: HighRes
    callback: Callable[[StepInfo], bool | None] | None
    progress: bool
    caches: list[StepCache] = field(default_factory=list)
    shifts: list[float] = field(default_factory=list)  # per pass
    steps_done: int = 0
    total_steps: int = 0


def _tiling(tile: int | None, stride: int | None, batch: int, width: int, height: int,
            notes: list[str]) -> tuple[int | None, int | None]:
    """Validated MultiDiffusion window and stride (pixels); the stride defaults to half a window. A window larger
    than the canvas is clamped to it (noted)."""
    if tile is None:
        if stride is not None:
            raise ValueError("tile_stride needs tile (the MultiDiffusion window, in pixels)")
        return None, None
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 pixels (the model's native size is a good "
                         f"choice), got {tile}")
    stride = max(8, tile // 16 * 8) if stride is None else stride
    if stride < 8 or stride % 8 or stride > tile:
        raise ValueError(f"tile_stride must be a multiple of 8 pixels, at most the tile ({tile}), got {stride}")
    if batch < 1:
        raise ValueError(f"tile_batch must be at least 1, got {batch}")
    if tile > min(width, height):
        notes.append(f"tile {tile} is larger than the {width}x{height} canvas: windows clamped to it")
    return tile, stride


def _hires_target(width: int, height: int, scale: float, upscale: str, edits: bool,
                  notes: list[str]) -> tuple[int, int]:
    """The hires fix's target (width, height): scale times the size, rounded to multiples of 16."""
    if edits:
        raise ValueError("the hires fix upscales a text-to-image generation; to upscale an image, resize it and "
                         "run img2img (image=..., strength=...)")
    if not scale >= 1:
        raise ValueError(f"hires_scale must be >= 1, got {scale}")
    if upscale not in hires.UPSCALERS:
        raise ValueError(f"unknown hires_upscale {upscale!r}; valid: {', '.join(hires.UPSCALERS)}")
    target = tuple(max(16, round(v * scale / 16) * 16) for v in (width, height))
    if target != (width * scale, height * scale):
        notes.append(f"hires size {width * scale:g}x{height * scale:g} rounded to {target[0]}x{target[1]} "
                     f"(multiples of 16)")
    return target


def _cache_stats(caches: list[StepCache]) -> dict:
    """One step-cache report for all the caches of a call (one per window batch and pass)."""
    return {**caches[0].stats(), "calls": sum(c.calls for c in caches),
            "full_passes": sum(c.full_passes for c in caches)}


def validate(*, width: int, height: int, steps: int, batch_size: int, cfg: float) -> None:
    """Reject settings the model cannot honour, naming the value and what would work."""
    for name, v in (("width", width), ("height", height)):
        if v < 16 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16 (latent 2x2 packing), got {v}; "
                             f"try {max(16, round(v / 16) * 16)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if cfg < 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
