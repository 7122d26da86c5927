"""Guidance: how the conditional and unconditional predictions combine into the x0_hat a sampler sees.

`GuidedDenoiser(velocity, Guidance(...))` wraps `velocity(x, t) -> v`, whose batch rows are [cond] or [cond; uncond]
(cond and uncond run as one batch). Called as `denoise(x, t)` it returns the guided x0_hat = x - t v; CFG++
samplers call `denoise.with_uncond(x, t)` for (x0_guided, x0_uncond). Because x0_hat = x - t v is affine in v,
CFG gives the same update in v, x0 or eps space.

Options (the same names in pipe(...), `chromaflow generate` and the servers):
- cfg: scale w. cfg == 1 means no guidance: the unconditional pass is skipped (CFG++ samplers excepted; for them
  cfg is CFG++'s lambda, typically 0.3-1, and the unconditional pass always runs).
- cfg_mode: "cfg"  v = v_u + w (v_c - v_u).
            "apg"  adaptive projected guidance (Sadat et al., their Algorithm 1) on x0_hat: d = x0_c - x0_u, with
                   momentum m <- apg_momentum m + d (reset when t goes back up), clipped to norm apg_norm_threshold
                   (0: off), split into parts parallel / orthogonal to x0_c;
                   x0 = x0_c + (w - 1)(d_orth + apg_eta d_par).
                   apg_eta 1 with no momentum or clipping is CFG.
            "cfg_zero_star"  CFG-Zero* (Fan et al.) on v: alpha = <v_c, v_u> / |v_u|^2 per sample,
                   v = alpha v_u + w (v_c - alpha v_u). (Its optional zero-init of the first steps is not included.)
- cfg_rescale: phi of CFG rescale (Lin et al.), applied to v last: v <- phi v std(v_c)/std(v) + (1 - phi) v.
- cfg_interval: (lo, hi); guidance applies only for t in [lo, hi], elsewhere the conditional pass alone runs.
All norms and stds are per sample, over every non-batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

CFG_MODES = ("cfg", "apg", "cfg_zero_star")
Velocity = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Guidance:
    cfg: float = 1.0
    cfg_mode: str = "cfg"
    cfg_rescale: float = 0.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    apg_eta: float = 1.0
    apg_norm_threshold: float = 0.0
    apg_momentum: float = 0.0

    def __post_init__(self):
        lo, hi = self.cfg_interval = tuple(float(v) for v in self.cfg_interval)
        if self.cfg_mode not in CFG_MODES:
            raise ValueError(f"unknown cfg_mode {self.cfg_mode!r}; valid: {', '.join(CFG_MODES)}")
        if self.cfg < 0:
            raise ValueError(f"cfg must be >= 0, got {self.cfg}")
        if not 0 <= self.cfg_rescale <= 1:
            raise ValueError(f"cfg_rescale must be in [0, 1], got {self.cfg_rescale}")
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"cfg_interval must be 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if self.apg_norm_threshold < 0:
            raise ValueError(f"apg_norm_threshold must be >= 0 (0 turns clipping off), got {self.apg_norm_threshold}")
        if not -1 < self.apg_momentum < 1:
            raise ValueError(f"apg_momentum must be in (-1, 1), got {self.apg_momentum}")

    def in_interval(self, t: float) -> bool:
        return self.cfg_interval[0] <= t <= self.cfg_interval[1]

    def changed(self) -> dict:
        """The options that differ from the defaults, except cfg (for settings and metadata)."""
        default = Guidance()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "cfg" and getattr(self, f.name) != getattr(default, f.name)}


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).flatten(1).sum(1).view(-1, *[1] * (a.ndim - 1))


def _std(a: Tensor) -> Tensor:
    return a.flatten(1).std(1).view(-1, *[1] * (a.ndim - 1))


class GuidedDenoiser:
    """`denoise(x, t) -> x0_hat` with guidance; `with_uncond(x, t)` for CFG++ samplers. Holds APG's momentum, so use
    one instance per sampling run."""

    def __init__(self, velocity: Velocity, guidance: Guidance):
        self.velocity, self.guidance = velocity, guidance
        self._momentum: Tensor | None = None
        self._last_t = float("inf")

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.guidance.cfg == 1 or not self.guidance.in_interval(float(t)):
            return x - t * self.velocity(x, t).to(x.dtype)
        return self._guided(x, t)[0]

    def with_uncond(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(guided x0_hat, unconditional x0_hat); outside cfg_interval both are the conditional prediction."""
        if not self.guidance.in_interval(float(t)):
            x0 = x - t * self.velocity(x, t).to(x.dtype)
            return x0, x0
        return self._guided(x, t)

    def _guided(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        g, w = self.guidance, self.guidance.cfg
        v_c, v_u = self.velocity(torch.cat([x, x]), t).to(x.dtype).chunk(2)
        if g.cfg_mode == "cfg":
            v = v_u + w * (v_c - v_u)
        elif g.cfg_mode == "cfg_zero_star":
            alpha = _dot(v_c, v_u) / (_dot(v_u, v_u) + 1e-12)
            v = alpha * v_u + w * (v_c - alpha * v_u)
        else:
            v = (x - self._apg(x - t * v_c, x - t * v_u, float(t))) / t
        if g.cfg_rescale:
            v = g.cfg_rescale * v * (_std(v_c) / _std(v)) + (1 - g.cfg_rescale) * v
        return x - t * v, x - t * v_u

    def _apg(self, x0_c: Tensor, x0_u: Tensor, t: float) -> Tensor:
        g = self.guidance
        diff = x0_c - x0_u
        if g.apg_momentum:
            if t > self._last_t or self._momentum is None:  # a new run (or a restart) starts a new average
                self._momentum = torch.zeros_like(diff)
            diff = self._momentum = diff + g.apg_momentum * self._momentum
        self._last_t = t
        if g.apg_norm_threshold > 0:
            diff = diff * (g.apg_norm_threshold / _dot(diff, diff).sqrt().clamp_min(1e-12)).clamp(max=1)
        unit = x0_c / _dot(x0_c, x0_c).sqrt().clamp_min(1e-12)
        parallel = _dot(diff, unit) * unit
        return x0_c + (g.cfg - 1) * (diff - parallel + g.apg_eta * parallel)


def cfg_denoiser(velocity: Velocity, cfg: float) -> GuidedDenoiser:
    """Plain classifier-free guidance (the common case)."""
    return GuidedDenoiser(velocity, Guidance(cfg=cfg))
