"""Timestep schedules for rectified flow: `fn(steps, shift) -> t`, descending, length steps + 1, ending at 0.

t == sigma (t = 1 is pure noise). The names and shapes follow ComfyUI's schedulers on a flow model, whose sigma
table is t_i = shift(i / 1000), i = 1..1000 (so the smallest nonzero t is shift(T_MIN)). We work in continuous t:
the table-based schedules (simple, normal, sgm_uniform, ddim_uniform, beta) warp an unshifted grid and then apply
the shift on top, so `schedule(n, s) == shift_time(schedule(n, 1), s)` for them. karras, exponential and
kl_optimal ignore the shift except through their lowest point shift(T_MIN): they are spacing laws between two
endpoints (designed for VE sigmas in [0.03, 80]), and ComfyUI applies them to the endpoints [shift(T_MIN), 1] only.
Because they pile steps up at tiny t, they suit flow models poorly; they are here because users know the names.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from scipy.special import betaincinv
from torch import Tensor

T_MIN = 1e-3  # the lowest timestep of a 1000-entry flow table (ComfyUI ModelSamplingDiscreteFlow)


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


# --- schedules --------------------------------------------------------------------------------------------------

def _finish(t: Tensor, shift: float | None = None) -> Tensor:
    """Shift (if given) the nonzero timesteps and append the terminal 0."""
    t = t.double()
    if shift is not None:
        t = shift_time(t, shift)
    return torch.cat([t, t.new_zeros(1)]).float()


def simple(steps: int, shift: float) -> Tensor:
    """Linear t from 1 down to 1/steps, then 0 (Flux / Chroma default; equals diffusers' Flux sigmas)."""
    return _finish(torch.linspace(1, 1 / steps, steps, dtype=torch.float64), shift)


def normal(steps: int, shift: float) -> Tensor:
    """Linear t from 1 down to the table's lowest step T_MIN, then 0."""
    return _finish(torch.linspace(1, T_MIN, steps, dtype=torch.float64), shift)


def sgm_uniform(steps: int, shift: float) -> Tensor:
    """steps + 1 linear points from 1 to T_MIN, the last dropped, then 0 (SGM / SDXL-turbo spacing)."""
    return _finish(torch.linspace(1, T_MIN, steps + 1, dtype=torch.float64)[:-1], shift)


def ddim_uniform(steps: int, shift: float) -> Tensor:
    """Every (1000 // steps)-th table entry from the bottom up, as DDIM strides: it starts just below t = 1."""
    stride = round(1 / T_MIN) // steps
    return _finish(((torch.arange(steps, dtype=torch.float64) * stride + 2) * T_MIN).flip(0), shift)


def beta(steps: int, shift: float, a: float = 0.6, b: float = 0.6) -> Tensor:
    """Beta(0.6, 0.6) quantiles (arXiv 2407.12173): dense at both ends, shift kept."""
    quantiles = betaincinv(a, b, (1 - torch.arange(steps, dtype=torch.float64) / steps).numpy())
    return _finish(T_MIN + (1 - T_MIN) * torch.from_numpy(quantiles), shift)


def karras(steps: int, shift: float, rho: float = 7.0) -> Tensor:
    """Karras et al.: linear in t^(1/rho) between 1 and shift(T_MIN)."""
    t_min = float(shift_time(torch.tensor(T_MIN, dtype=torch.float64), shift))
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return _finish((1 + ramp * (t_min ** (1 / rho) - 1)) ** rho)


def exponential(steps: int, shift: float) -> Tensor:
    """Log-linear between 1 and shift(T_MIN)."""
    t_min = float(shift_time(torch.tensor(T_MIN, dtype=torch.float64), shift))
    return _finish(torch.linspace(0, math.log(t_min), steps, dtype=torch.float64).exp())


def kl_optimal(steps: int, shift: float) -> Tensor:
    """Linear in arctan(t) between 1 and shift(T_MIN) (the KL-optimal schedule of arXiv 2404.14507)."""
    t_min = float(shift_time(torch.tensor(T_MIN, dtype=torch.float64), shift))
    return _finish(torch.linspace(math.atan(1), math.atan(t_min), steps, dtype=torch.float64).tan())


SCHEDULERS: dict[str, Callable[[int, float], Tensor]] = {
    "simple": simple, "normal": normal, "sgm_uniform": sgm_uniform, "ddim_uniform": ddim_uniform, "beta": beta,
    "karras": karras, "exponential": exponential, "kl_optimal": kl_optimal,
}
SHIFT_IGNORED = ("karras", "exponential", "kl_optimal")  # only their lowest point moves with the shift
