"""Text-to-image pipeline: prompt -> text encoding -> sampled latents -> VAE decode -> PIL images.

It composes the layers below and nothing else: the transformer predicts velocity, `engine.sampling` owns the
schedule / sampler / CFG, the VAE maps latents to pixels. Later modes (img2img, inpaint, tiles) reuse it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..engine import sampling
from ..models.text import TextEncoding, chroma_mask
from ..models.step_cache import StepCache
from ..models.transformer import MMDiT, image_ids
from ..models.vae import VAE, pack, unpack

VERSION = "chromaflow 0.1.0"


CACHE_THRESHOLDS = {"fbc": 0.1, "teacache": 0.3}  # defaults per step-cache method (benchmarks/caching.py)


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
        while len(self.text_cache) > self.text_cache_size:
            self.text_cache.pop(next(iter(self.text_cache)))
        rows = [self.text_cache[p] for p in prompts]
        length = max(len(r) for r in rows)
        embeds = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, length - len(r))) for r in rows])
        mask = torch.arange(length)[None] < torch.tensor([len(r) for r in rows])[:, None]
        return TextEncoding(embeds.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        return latents_to_pil(self.vae.decode(latents.to(next(self.vae.parameters()).dtype)))

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
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", width: int | None = None, height: int | None = None,
                 steps: int | None = None, cfg: float | None = None, seed: int | None = None, batch_size: int = 1,
                 sampler: str | None = None, scheduler: str | None = None, shift: float | None = None,
                 cfg_mode: str | None = None, cfg_rescale: float | None = None,
                 cfg_interval: tuple[float, float] | None = None, apg_eta: float | None = None,
                 apg_norm_threshold: float | None = None, apg_momentum: float | None = None,
                 sampler_options: dict | None = None, cache: str | None = None, cache_threshold: float | None = None,
                 callback: Callable[[StepInfo], bool | None] | None = None, progress: bool = True) -> Generation:
        """Generate `batch_size` images per prompt (a list of prompts runs as one batch; image i uses seed + i).

        `sampler` / `scheduler` take our (ComfyUI) names or A1111 ones ("DPM++ 2M Karras" sets both); the cfg_* and
        apg_* options are engine.guidance's; `sampler_options` are the sampler's own keywords (eta, s_noise, order).
        Unset options take the model's defaults (samplers and guidance: their own). `cache` ("fbc" First Block
        Cache, "teacache") skips most of the transformer on steps whose input barely changed (models.step_cache);
        settings["cache"] then reports how many calls ran in full.
        `callback(StepInfo)` runs after every step; returning False interrupts, and the images are then
        decoded from the latest clean estimate (settings["interrupted"])."""
        d = self.defaults
        pick = lambda value, default: default if value is None else value
        width, height, steps, cfg = pick(width, d.width), pick(height, d.height), pick(steps, d.steps), pick(cfg, d.cfg)
        sampler, named_scheduler = sampling.resolve_sampler(pick(sampler, d.sampler))
        scheduler = sampling.resolve_scheduler(scheduler) if scheduler is not None else None
        scheduler = scheduler or named_scheduler or sampling.resolve_scheduler(d.scheduler) or "simple"
        shift = pick(shift, d.shift)
        seed = random.randrange(2**32) if seed is None else int(seed)
        validate(width=width, height=height, steps=steps, batch_size=batch_size, cfg=cfg)
        options = {k: v for k, v in dict(cfg_mode=cfg_mode, cfg_rescale=cfg_rescale, cfg_interval=cfg_interval,
                                         apg_eta=apg_eta, apg_norm_threshold=apg_norm_threshold,
                                         apg_momentum=apg_momentum).items() if v is not None}
        guidance = sampling.Guidance(cfg=cfg, **options)
        sampler_options = dict(sampler_options or {})
        uses_uncond = cfg != 1 or sampling.SAMPLERS[sampler].needs_uncond

        prompts = [p for p in ([prompt] if isinstance(prompt, str) else prompt) for _ in range(batch_size)]
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else \
            [p for p in negative_prompt for _ in range(batch_size)]
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives) // batch_size} negative prompts for {len(prompts) // batch_size} "
                             "prompts; give one negative prompt, or one per prompt")
        n = len(prompts)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        noise = self.initial_noise(seed, n, height, width, generators)
        _, _, h, w = noise.shape
        num_tokens = (h // 2) * (w // 2)
        shift_used = sampling.resolve_shift(shift, num_tokens)
        sigmas = sampling.schedule(steps, scheduler, shift_used).to(self.device)

        text = self.encode_prompts(prompts + (negatives if uses_uncond else []))
        ids = image_ids(2 * n, h // 2, w // 2, self.device)
        txt_ids = torch.zeros(*text.mask.shape, 3, device=self.device)

        step_cache = None if cache is None else \
            StepCache(cache, CACHE_THRESHOLDS.get(cache, 0.1) if cache_threshold is None else cache_threshold)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            n = x.shape[0]  # B rows of cond, or 2B: cond then uncond
            return self.transformer(x, ids[:n], text.embeds[:n], txt_ids[:n], t.expand(n), txt_mask=text.mask[:n],
                                    cache=step_cache)

        last = {"x0": None}

        def on_step(i, t, x, x0):
            last["x0"] = x0
            if callback is not None and callback(StepInfo(i, steps, t, unpack(x, h, w), unpack(x0, h, w))) is False:
                raise Interrupted

        interrupted = False
        try:
            # x_t0 = t0 eps + (1 - t0) * 0: a schedule may start below t = 1 (ddim_uniform)
            x = sampling.sample(sampler, sampling.GuidedDenoiser(velocity, guidance), pack(noise) * sigmas[0], sigmas,
                                on_step, progress, generator=generators, **sampler_options)
        except Interrupted:
            x, interrupted = last["x0"], True
        latents = unpack(x, h, w)
        settings = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                        cfg=cfg, seed=seed, batch_size=batch_size, sampler=sampler, scheduler=scheduler,
                        shift=round(shift_used, 4), **guidance.changed(),
                        **({"sampler_options": sampler_options} if sampler_options else {}),
                        **({"cache": step_cache.stats()} if step_cache else {}),
                        model=self.name, model_hash=self.model_hash, version=VERSION)
        if interrupted:
            settings["interrupted"] = True
        return Generation(self.decode(latents), settings, latents)


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
