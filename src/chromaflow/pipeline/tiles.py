"""Large canvases by MultiDiffusion (Bar-Tal et al. 2023): the model only ever sees windows of its native size.

Each step, every window (`tile` pixels, `tile_stride` apart, the last one flush with the edge) is denoised as an
image of its own, and each latent pixel takes the average of the predictions of the windows covering it. With a
deterministic step that *is* MultiDiffusion's rule x' = sum_w Phi_w(x) / count: every window starts from the same
x and Euler's step (s/t) x + (1 - s/t) x0_hat is affine in x0_hat, so averaging the stepped windows equals
stepping the averaged x0_hat. The same holds for every one-evaluation sampler that is linear in its past
predictions (DPM++ 2M, UniPC, DEIS, ...); samplers with two evaluations per step average at both evaluations.
Windows use their own (local) positions, so each one looks exactly like a native-size image to the model.

Region prompts (MultiDiffusion's region-based mode): `regions` = [(prompt, mask), ...] at canvas size. Every
window is denoised once per prompt, and a pixel averages the predictions weighted by the prompts' masks; the main
prompt takes the background weight max(0, 1 - sum of the region masks). Regions work without tiles too (the
canvas is then the one window). MultiDiffusion's "bootstrapping" (regions composited over random colours in the
first steps) is not included.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..models.vae import tile_starts
from .denoise import ModeDenoiser


def windows(height: int, width: int, size: tuple[int, int], stride: tuple[int, int]) -> list[tuple[slice, slice]]:
    """Row-major (rows, cols) slices of the windows covering a height x width latent."""
    return [(slice(y, y + size[0]), slice(x, x + size[1])) for y in tile_starts(height, size[0], stride[0])
            for x in tile_starts(width, size[1], stride[1])]


def multidiffusion(make_denoiser: Callable[[int, int], object], views: list[tuple[slice, slice]],
                   weights: list[Tensor], batch: int = 4) -> ModeDenoiser:
    """Average a denoiser over `views` (window slices of the latent), once per weight map in `weights`
    ((1, 1, h, w) each, one per prompt). `make_denoiser(prompt_index, n_windows)` returns a denoiser for a batch
    of n windows stacked window-major (rows of window 0, then of window 1, ...); windows run `batch` at a time,
    and windows where a prompt's weight is zero are skipped."""
    plan = []  # (weights, windows, denoiser): one entry per batch of windows
    for index, weight in enumerate(weights):
        active = [v for v in views if bool(weight[(..., *v)].any())]
        plan += [(weight, active[i:i + batch], make_denoiser(index, len(active[i:i + batch])))
                 for i in range(0, len(active), batch)]
    total = torch.zeros_like(weights[0])
    for weight, chunk, _ in plan:
        for view in chunk:
            total[(..., *view)] += weight[(..., *view)]

    def predict(x: Tensor, t: Tensor, evaluate) -> tuple[Tensor, ...]:
        sums = None
        rows = x.shape[0]
        for weight, chunk, denoiser in plan:
            outputs = evaluate(denoiser, torch.cat([x[(..., *view)] for view in chunk]))
            sums = sums or [torch.zeros_like(x) for _ in outputs]
            for acc, out in zip(sums, outputs):
                for k, view in enumerate(chunk):
                    acc[(..., *view)] += weight[(..., *view)] * out[k * rows:(k + 1) * rows]
        return tuple(acc / total for acc in sums)
    return ModeDenoiser(predict)
