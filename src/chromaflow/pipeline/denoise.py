"""How pipeline modes change what the sampler sees, without a sampling loop of their own.

A sampler (engine.samplers) only calls `denoise(x, t) -> x0_hat`, or `denoise.with_uncond(x, t)` for CFG++. Every
mode is a wrapper around that call: inpainting blends the known image in before and after it (edit.py),
MultiDiffusion averages it over windows (tiles.py). A `ModeDenoiser` is built from one function
`predict(x, t, evaluate)`, where `evaluate(inner, x)` returns the inner denoiser's outputs as a tuple — (x0,) for
a plain call, (x0_guided, x0_uncond) when the sampler asked for with_uncond — and `predict` returns the same
tuple transformed. So each mode is written once and works with every sampler, CFG++ included, and modes nest.
Modes work on spatial latents (B, C, h, w); `packed` adapts them to the packed tokens the samplers step on.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..models.vae import pack, unpack

Evaluate = Callable[[object, Tensor], tuple[Tensor, ...]]
Predict = Callable[[Tensor, Tensor, Evaluate], tuple[Tensor, ...]]


class ModeDenoiser:
    """A denoiser (and CFG++ denoiser) made of one `predict(x, t, evaluate)` function."""

    def __init__(self, predict: Predict):
        self.predict = predict

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.predict(x, t, lambda inner, x_: (inner(x_, t),))[0]

    def with_uncond(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.predict(x, t, lambda inner, x_: tuple(inner.with_uncond(x_, t)))


def packed(inner, h: int, w: int) -> ModeDenoiser:
    """A spatial denoiser driven by a sampler that steps on packed tokens (B, (h/2)(w/2), 4C) of an h x w latent.
    Packing is a permutation, so this changes no number."""
    return ModeDenoiser(lambda x, t, evaluate: tuple(pack(o) for o in evaluate(inner, unpack(x, h, w))))
