"""Rectified-flow training math: timestep densities, minibatch OT pairing of noise and data, and the targets.

x_t = (1 - t) x0 + t eps, target v = eps - x0 (spec chroma-architecture.md §3).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .sampling import flux_mu, shift_time

TIMESTEP_METHODS = ("uniform", "logit_normal", "mode", "chroma")


def chroma_density_grid(points: int = 1000) -> tuple[Tensor, Tensor]:
    """Chroma's tail-heavy density p(t) ∝ 2 - 7.7 (t - 1/2)^2 on a grid, with its CDF (for inverse-CDF sampling)."""
    grid = torch.linspace(0, 1, points, dtype=torch.float64)
    density = 2 - 7.7 * (grid - 0.5) ** 2
    return grid, torch.cumsum(density / density.sum(), 0)


def sample_timesteps(n: int, generator: torch.Generator, method: str = "chroma", *, logit_mean: float = 0.0,
                     logit_std: float = 1.0, mode_scale: float = 1.29, shift: float | None = None) -> Tensor:
    """n training timesteps in [0, 1] (1 = noise) from one of TIMESTEP_METHODS, optionally shifted (SD3 form)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if method == "uniform":
        t = u
    elif method == "logit_normal":
        t = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, dtype=torch.float64))
    elif method == "mode":  # SD3's mode sampling with heavier or lighter middle
        t = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    elif method == "chroma":
        grid, cdf = chroma_density_grid()
        t = grid[torch.searchsorted(cdf, u, right=True).clamp(max=len(grid) - 1)]
    else:
        raise ValueError(f"unknown timestep method {method!r}; valid: {', '.join(TIMESTEP_METHODS)}")
    if shift is not None and shift != 1:
        t = shift_time(t, shift)
    return t.float()


def resolution_shift(spec: float | str | None, num_tokens: int) -> float | None:
    """Training-time shift: a number, "flux" (e^mu of the token count), or None for no shift."""
    if spec == "flux":
        return math.exp(flux_mu(num_tokens))
    return None if spec is None else float(spec)


def ot_pair(latents: Tensor, noise: Tensor) -> Tensor:
    """Reorder `noise` so image i gets the noise that maximises the batch's total cosine similarity (Hungarian)."""
    a = torch.nn.functional.normalize(latents.flatten(1).double(), dim=1)
    b = torch.nn.functional.normalize(noise.flatten(1).double(), dim=1)
    _, cols = linear_sum_assignment((-(a @ b.T)).numpy())
    return noise[torch.from_numpy(np.asarray(cols))]


def flow_pair(x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, v target) for timesteps t broadcast over the trailing dims."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * noise, noise - x0
