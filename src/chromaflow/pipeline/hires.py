"""Beyond the native resolution: what each model call sees at large sizes, and the hires fix.

HiDiffusion (Zhang et al. 2023) makes UNets generate above their training size with two changes: RAU-Net (shrink
the feature map in the deep blocks early in sampling) and MSW-MSA (shifted-window self-attention in the
high-resolution blocks). An MMDiT has no resolution hierarchy to shrink; what carries over are the ideas under
them, both per model call here:
(a) positions: image RoPE ids beyond the trained grid are out of distribution. `rope_scaling` "interpolate"
    squeezes the positions of a grid `factor` times the native side into the trained range; "ntk" keeps the
    local frequencies and stretches the slow ones (models.transformer.RopeScaling). factor = the largest ratio
    of grid side to native side; nothing changes at or below the native size.
(b) attention span: `attention_window` (pixels) restricts image tokens to windows of about the native size,
    shifted by half a window every other block, with text global (models.transformer.WindowedAttention): each
    token attends over the context it was trained with, and cost grows linearly with pixels. It can be limited to
    the first fraction of steps (`attention_window_steps`: global structure, then full attention to make the
    windows agree) and of blocks (`attention_window_blocks`).

Hires fix (A1111): generate at the given size, upscale the latents ("latent": bicubic in latent space) or the
image ("pixel": decode, bicubic, encode), and re-denoise at the target size from `hires_strength` with the schedule
recomputed for the new size (the resolution shift grows with the token count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ..models.transformer import ROPE_SCALINGS, RopeScaling, WindowedAttention
from ..models.vae import VAE

UPSCALERS = ("latent", "pixel")


@dataclass
class HighRes:
    """Per-call model options for a grid of any size (tokens); all off by default."""
    native: tuple[int, int]  # the model's native grid, tokens (rows, cols)
    rope_scaling: str | None = None
    window: tuple[int, int] | None = None  # tokens
    window_blocks: int = 1 << 30  # the first blocks that use windows
    window_steps: float = 1.0  # fraction of the steps (from the first) that use windows

    def __post_init__(self):
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"unknown rope_scaling {self.rope_scaling!r}; valid: {', '.join(ROPE_SCALINGS)}")
        if not 0 <= self.window_steps <= 1:
            raise ValueError(f"attention_window_steps is a fraction of the steps in [0, 1], got {self.window_steps}")

    def window_until(self, sigmas: Tensor) -> float:
        """Windows are used while t is above this, i.e. in the first window_steps of the steps of `sigmas`."""
        return float(sigmas[round(self.window_steps * (len(sigmas) - 1))])

    def model_options(self, rows: int, cols: int, t: Tensor, window_until: float) -> dict:
        """The transformer's rope_scaling / window keywords for a rows x cols grid at time t."""
        options = {}
        factor = max(rows / self.native[0], cols / self.native[1])
        if self.rope_scaling is not None and factor > 1:
            options["rope_scaling"] = RopeScaling(self.rope_scaling, factor)
        if self.window is not None and float(t) > window_until and (rows > self.window[0] or cols > self.window[1]):
            options["window"] = WindowedAttention((rows, cols), self.window, self.window_blocks)
        return options


def upscale(latents: Tensor, size: tuple[int, int], method: str, vae: VAE, vae_tile: int | None = None) -> Tensor:
    """Latents (B, C, h, w) -> (B, C, *size) by bicubic interpolation of the latents or of the decoded image."""
    if method == "latent":
        return F.interpolate(latents, size=size, mode="bicubic", align_corners=False)
    if method != "pixel":
        raise ValueError(f"unknown hires_upscale {method!r}; valid: {', '.join(UPSCALERS)}")
    images = vae.decode(latents, tile=vae_tile).float().clamp(-1, 1)
    scale = vae.downsample
    images = F.interpolate(images, size=(size[0] * scale, size[1] * scale), mode="bicubic", align_corners=False)
    return vae.encode(images.clamp(-1, 1), tile=vae_tile).float().to(latents.device)
