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
from ..models.transformer import MMDiT, image_ids
from ..models.vae import VAE, pack, unpack

VERSION = "chromaflow 0.1.0"


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

    # pieces --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextEncoding:
        """Encode each distinct prompt once; rows come back in the order given, with Chroma's one-pad mask."""
        unique = list(dict.fromkeys(prompts))
        enc = self.text_encoder.encode(unique)
        rows = torch.tensor([unique.index(p) for p in prompts])
        return TextEncoding(enc.embeds[rows].to(self.device), chroma_mask(enc.mask[rows]).to(self.device))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        return latents_to_pil(self.vae.decode(latents.to(next(self.vae.parameters()).dtype)))

    def initial_noise(self, seed: int, batch_size: int, height: int, width: int) -> Tensor:
        """Image i gets noise from its own CPU generator seeded seed + i: reproducible alone and in a batch."""
        down = self.vae.downsample
        shape = (self.vae.latent_channels, height // down, width // down)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
                            for i in range(batch_size)]).to(self.device)

    # the call ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] = "", width: int | None = None, height: int | None = None,
                 steps: int | None = None, cfg: float | None = None, seed: int | None = None, batch_size: int = 1,
                 sampler: str | None = None, scheduler: str | None = None, shift: float | None = None,
                 callback: Callable[[StepInfo], bool | None] | None = None, progress: bool = True) -> Generation:
        """Generate `batch_size` images per prompt (a list of prompts runs as one batch; image i uses seed + i).

        `callback(StepInfo)` runs after every model evaluation; returning False interrupts, and the images are then
        decoded from the latest clean estimate (settings["interrupted"])."""
        d = self.defaults
        pick = lambda value, default: default if value is None else value
        width, height, steps, cfg = pick(width, d.width), pick(height, d.height), pick(steps, d.steps), pick(cfg, d.cfg)
        sampler, scheduler, shift = pick(sampler, d.sampler), pick(scheduler, d.scheduler), pick(shift, d.shift)
        seed = random.randrange(2**32) if seed is None else int(seed)
        validate(width=width, height=height, steps=steps, batch_size=batch_size, cfg=cfg)
        sampling.check_name(sampler, sampling.SAMPLERS, "sampler")
        sampling.check_name(scheduler, sampling.SCHEDULERS, "scheduler")

        prompts = [p for p in ([prompt] if isinstance(prompt, str) else prompt) for _ in range(batch_size)]
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else \
            [p for p in negative_prompt for _ in range(batch_size)]
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives) // batch_size} negative prompts for {len(prompts) // batch_size} "
                             "prompts; give one negative prompt, or one per prompt")
        n = len(prompts)
        noise = self.initial_noise(seed, n, height, width)
        _, _, h, w = noise.shape
        num_tokens = (h // 2) * (w // 2)
        shift_used = sampling.resolve_shift(shift, num_tokens)
        sigmas = sampling.schedule(steps, scheduler, shift_used).to(self.device)

        text = self.encode_prompts(prompts + (negatives if cfg != 1 else []))
        ids = image_ids(2 * n, h // 2, w // 2, self.device)
        txt_ids = torch.zeros(*text.mask.shape, 3, device=self.device)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            n = x.shape[0]  # B rows of cond, or 2B: cond then uncond
            return self.transformer(x, ids[:n], text.embeds[:n], txt_ids[:n], t.expand(n), txt_mask=text.mask[:n])

        last = {"x0": None}

        def on_step(i, t, x, x0):
            last["x0"] = x0
            if callback is not None and callback(StepInfo(i, steps, t, unpack(x, h, w), unpack(x0, h, w))) is False:
                raise Interrupted

        interrupted = False
        try:
            x = sampling.sample(sampler, sampling.cfg_denoiser(velocity, cfg), pack(noise), sigmas, on_step, progress)
        except Interrupted:
            x, interrupted = last["x0"], True
        latents = unpack(x, h, w)
        settings = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, steps=steps,
                        cfg=cfg, seed=seed, batch_size=batch_size, sampler=sampler, scheduler=scheduler,
                        shift=round(shift_used, 4), model=self.name, model_hash=self.model_hash, version=VERSION)
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
