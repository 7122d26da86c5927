"""Schedules, samplers and guidance for rectified flow (sigma == t; t = 1 is noise, t = 0 is data).

A denoiser is any callable `denoise(x, t) -> x0_hat` with `t` a scalar tensor; the velocity is
`v = (x - x0_hat) / t`. Every sampler is one function `sampler(denoise, x, sigmas, callback=None) -> x`
(the k-diffusion shape), registered by name in SAMPLERS; schedules likewise in SCHEDULERS.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

Denoiser = Callable[[Tensor, Tensor], Tensor]
# callback(step, t, x, x0_hat); raising from it stops sampling
StepCallback = Callable[[int, float, Tensor, Tensor], None]


# --- shifts ---------------------------------------------------------------------------------------------------

def flux_mu(num_tokens: int, base_tokens: int = 256, max_tokens: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's resolution-dependent mu: linear in packed token count through (256, 0.5) and (4096, 1.15)."""
    return base_shift + (max_shift - base_shift) * (num_tokens - base_tokens) / (max_tokens - base_tokens)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3 shift t' = a t / (1 + (a - 1) t); Flux's time_shift(mu, 1, t) is the same with a = e^mu."""
    return shift * t / (1 + (shift - 1) * t)


def resolve_shift(shift: float | None, num_tokens: int) -> float:
    """A fixed shift if given, else Flux's dynamic shift e^mu(num_tokens)."""
    return float(shift) if shift is not None else math.exp(flux_mu(num_tokens))


# --- schedules: steps -> descending t of length steps + 1, ending at 0 ---------------------------------------

def simple_schedule(steps: int, shift: float) -> Tensor:
    """Linear t from 1 to 0, shifted (Flux / Chroma default)."""
    return shift_time(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift).float()


SCHEDULERS: dict[str, Callable[[int, float], Tensor]] = {"simple": simple_schedule, "normal": simple_schedule}


def schedule(steps: int, scheduler: str = "simple", shift: float = 1.0) -> Tensor:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return SCHEDULERS[check_name(scheduler, SCHEDULERS, "scheduler")](steps, shift)


# --- samplers -------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_euler(denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None) -> Tensor:
    """First-order Euler on dx/dt = v: x <- x + (t_next - t) v."""
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, t)
        if callback is not None:
            callback(i, float(t), x, x0)
        x = x0 if t_next == 0 else x + (t_next - t) * (x - x0) / t
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": sample_euler}


def check_name(name: str, registry: dict, kind: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(registry))}")
    return name


def sample(sampler: str, denoise: Denoiser, x: Tensor, sigmas: Tensor, callback: StepCallback | None = None,
           progress: bool = True) -> Tensor:
    """Run a named sampler with a tqdm bar over its steps."""
    fn = SAMPLERS[check_name(sampler, SAMPLERS, "sampler")]
    bar = tqdm(total=len(sigmas) - 1, desc=sampler, disable=not progress, leave=False)

    def step(i, t, x_, x0):
        bar.update(1)
        if callback is not None:
            callback(i, t, x_, x0)

    try:
        return fn(denoise, x, sigmas, callback=step)
    finally:
        bar.close()


# --- guidance -------------------------------------------------------------------------------------------------

def cfg_denoiser(velocity: Callable[[Tensor, Tensor], Tensor], cfg: float) -> Denoiser:
    """Classifier-free guidance around `velocity(x, t) -> v`, whose batch rows are [cond] or [cond; uncond].

    cond and uncond run as one batch; cfg == 1 skips the unconditional half entirely.
    v = v_uncond + cfg (v_cond - v_uncond); returned as x0_hat = x - t v.
    """
    def denoise(x: Tensor, t: Tensor) -> Tensor:
        if cfg == 1:
            v = velocity(x, t)
        else:
            v_cond, v_uncond = velocity(torch.cat([x, x]), t).chunk(2)
            v = v_uncond + cfg * (v_cond - v_uncond)
        return x - t * v.to(x.dtype)
    return denoise
