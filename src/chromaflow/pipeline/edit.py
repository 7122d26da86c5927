"""Editing modes: img2img, inpainting (hard and soft masks), outpainting — start latents and a per-step blend.

img2img. `strength` s runs the last ceil(s * steps) steps of the full schedule (diffusers' and A1111's rule), so
the start time is t_start = sigmas[steps - ceil(s * steps)] on the *shifted* schedule, and the sampler starts
from x = t_start * noise + (1 - t_start) * x0_image. With Flux's resolution shift t_start is well above s (the
shift spends most steps at high noise): at 1024 px (shift 3.16, 28 steps) s = 0.3 starts at t = 0.60, s = 0.5 at
t = 0.76, s = 0.75 at t = 0.905; the built-in model at 256 px (shift 1.65, 20 steps): 0.41, 0.62, 0.83.
`start_time` gives it for any setting, and settings["t_start"] reports it.
s = 0 runs no step (the output is the input through the VAE); s = 1 starts from pure noise (the input is ignored).

Inpainting. The mask is white (1) where the image is repainted. Every model call sees the known region re-noised
to the current t with the starting noise, and its prediction there is replaced by the known latents (ComfyUI's
rule; it wraps the denoiser, so it works with every sampler). Soft masks are differential diffusion: a latent
pixel of mask value m joins the repainting once the remaining noise t / t_start falls to m, i.e. it starts at
t = m * t_start (1 from the first step, 0 never); binary masks reduce to plain blending. The latent mask is the
pixel mask averaged over each 8 x 8 block. `mask_blur` (a Gaussian sigma in pixels) feathers the mask first.
The decoded image is composited over the input, so pixels the (feathered) mask leaves at 0 come back exactly.

Outpainting pads the canvas by (left, top, right, bottom) filled by `outpaint_fill` ("edge" repeats the border,
"reflect" mirrors it, "gray" is flat mid-gray), and inpaints with a soft mask whose keep-weight decays with the
distance d (pixels) from the original image, exp(-d / (k * max_pad)) with k = `outpaint_decay`: near the image
the padding starts late (it continues the image), far away it is generated from the start; smaller k copies less
of the fill. The padding comes out fully generated; only the original pixels are kept.
Sizes must be multiples of 16: padding is rounded up on the wider side of each axis (reported), and an input
image of another size is padded with its edge for sampling and cropped back (output = input size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import Tensor

from .denoise import ModeDenoiser

FILLS = ("edge", "reflect", "gray")  # numpy pad modes, and "gray"
MULTIPLE = 16  # pixels: 8x VAE downsampling, then 2x2 packing


def start_index(strength: float, steps: int) -> int:
    """Index into the schedule where img2img starts: the last ceil(strength * steps) steps run."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1] (0 keeps the image, 1 ignores it), got {strength}")
    return steps - min(steps, math.ceil(strength * steps - 1e-9))


def start_time(strength: float, sigmas: Tensor) -> float:
    """The t img2img starts from on a schedule (what `strength` means in noise)."""
    return float(sigmas[start_index(strength, len(sigmas) - 1)])


def to_pixels(image) -> np.ndarray:
    """A PIL image, (H, W, 3) uint8 array or (3, H, W) / (1, 3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    if isinstance(image, Tensor):
        image = image.detach().float().cpu()
        image = image[0] if image.ndim == 4 else image
        return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image, an (H, W, 3) uint8 array or a (3, H, W) tensor in [-1, 1]; "
                         f"got an array of shape {array.shape} and dtype {array.dtype}")
    return array


def to_mask(mask, size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A PIL image (white = 1), bool / uint8 / float array or tensor in [0, 1] -> (H, W) float32, checked to be
    the image's size (width, height)."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    mask = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    mask = mask.squeeze()
    if mask.ndim != 2:
        raise ValueError(f"{what} must be one channel (H, W); got shape {mask.shape}")
    if (mask.shape[1], mask.shape[0]) != tuple(size):
        raise ValueError(f"{what} is {mask.shape[1]}x{mask.shape[0]} but the image is {size[0]}x{size[1]}; "
                         f"give a {what} of the image's size (white = repaint)")
    if mask.dtype == np.uint8:
        return mask.astype(np.float32) / 255
    mask = mask.astype(np.float32)
    if mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"{what} values must be in [0, 1] (or uint8 0..255), got {mask.min()}..{mask.max()}")
    return mask


def round_padding(pad: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) grown so the padded canvas is a multiple of 16 each way; the extra goes to the
    larger pad of each axis (right / bottom on a tie)."""
    left, top, right, bottom = pad
    extra_w, extra_h = -(width + left + right) % MULTIPLE, -(height + top + bottom) % MULTIPLE
    left, right = (left + extra_w, right) if left > right else (left, right + extra_w)
    top, bottom = (top + extra_h, bottom) if top > bottom else (top, bottom + extra_h)
    return left, top, right, bottom


def _pad(array: np.ndarray, pad: tuple[int, int, int, int], fill: str = "gray") -> np.ndarray:
    """Pad an image (H, W, 3) or mask (H, W) by (left, top, right, bottom); "gray" pads images with mid-gray and
    masks with 0."""
    left, top, right, bottom = pad
    widths = ((top, bottom), (left, right)) + ((0, 0),) * (array.ndim - 2)
    if fill == "gray":
        return np.pad(array, widths, constant_values=128 if array.ndim == 3 else 0)
    return np.pad(array, widths, mode=fill)


def _blur(mask: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(mask, sigma, mode="nearest") if sigma > 0 else mask


def _quantize(mask: np.ndarray) -> np.ndarray:
    """To 8-bit steps like a mask image: a blur's far tails become exactly 0 (those pixels are kept exactly)."""
    return np.round(np.clip(mask, 0, 1) * 255).astype(np.float32) / 255


@dataclass
class EditCanvas:
    """What an edit samples from: the canvas pixels, the mask driving sampling and the keep-weights of the final
    composite (None for img2img), and the output size (the canvas may be padded to a multiple of 16)."""
    pixels: np.ndarray  # (H, W, 3) uint8, sides multiples of 16
    sample_mask: np.ndarray | None  # (H, W) in [0, 1]: 1 repaints from the start, m from t = m * t_start
    keep: np.ndarray | None  # (H, W) in [0, 1]: weight of the canvas pixels in the final image
    size: tuple[int, int]  # output (width, height), a top-left crop of the canvas
    notes: list[str] = field(default_factory=list)  # adjustments made, for the user
    padding: tuple[int, int, int, int] | None = None  # outpainting, after rounding

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    def tensor(self) -> Tensor:
        """(1, 3, H, W) in [-1, 1]."""
        return torch.from_numpy(np.array(self.pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1

    def composite(self, images: list[Image.Image]) -> list[Image.Image]:
        """Decoded images laid over the canvas with the keep-weights, then cropped to the output size."""
        out = []
        for image in images:
            pixels = np.asarray(image.convert("RGB"))
            if self.keep is not None:
                keep = self.keep[..., None]
                blend = np.round(keep * self.pixels + (1 - keep) * pixels).astype(np.uint8)
                pixels = np.where(keep == 1, self.pixels, blend)
            out.append(Image.fromarray(np.ascontiguousarray(pixels[:self.size[1], :self.size[0]])))
        return out


def prepare(image, mask=None, width: int | None = None, height: int | None = None,
            outpaint: tuple[int, int, int, int] | None = None, fill: str = "edge", decay: float = 0.5,
            mask_blur: float = 0.0) -> EditCanvas:
    """Resolve an edit request into its canvas and masks (see the module docstring). `width` / `height` resize
    the input (and its mask) first."""
    pixels = to_pixels(image)
    repaint = None if mask is None else to_mask(mask, (pixels.shape[1], pixels.shape[0]))
    if mask_blur < 0:
        raise ValueError(f"mask_blur must be >= 0 (a Gaussian sigma in pixels), got {mask_blur}")
    if outpaint is not None and (width or height):
        raise ValueError("width / height resize the input of img2img and inpainting; with outpaint the canvas is "
                         "the image plus its padding (resize the image first)")
    notes = []
    size = (width or pixels.shape[1], height or pixels.shape[0])
    if size != (pixels.shape[1], pixels.shape[0]):
        notes.append(f"input resized from {pixels.shape[1]}x{pixels.shape[0]} to {size[0]}x{size[1]}")
        pixels = np.asarray(Image.fromarray(pixels).resize(size, Image.LANCZOS))
        if repaint is not None:
            repaint = np.clip(np.asarray(Image.fromarray(repaint).resize(size, Image.BILINEAR)), 0, 1)
    if outpaint is not None:
        return _outpaint(pixels, repaint, tuple(outpaint), fill, decay, mask_blur, notes)
    pad = (0, 0, -size[0] % MULTIPLE, -size[1] % MULTIPLE)
    if any(pad):
        notes.append(f"{size[0]}x{size[1]} sampled as {size[0] + pad[2]}x{size[1] + pad[3]} (edge-padded to "
                     f"multiples of 16), output cropped back")
        pixels = _pad(pixels, pad, "edge")
        repaint = None if repaint is None else _pad(repaint, pad)  # the strip is kept, then cropped away
    if repaint is None:
        return EditCanvas(pixels, None, None, size, notes)
    repaint = _quantize(_blur(repaint, mask_blur))
    return EditCanvas(pixels, repaint, 1 - repaint, size, notes)


def _outpaint(pixels: np.ndarray, repaint: np.ndarray | None, pad: tuple, fill: str, decay: float, mask_blur: float,
              notes: list[str]) -> EditCanvas:
    if len(pad) != 4 or any(int(p) != p or p < 0 for p in pad) or not any(pad):
        raise ValueError(f"outpaint takes four non-negative pixel counts (left, top, right, bottom), not all 0; "
                         f"got {pad}")
    if fill not in FILLS:
        raise ValueError(f"unknown outpaint_fill {fill!r}; valid: {', '.join(FILLS)}")
    if not decay > 0:
        raise ValueError(f"outpaint_decay (k in exp(-d / (k * max_pad))) must be > 0, got {decay}")
    height, width = pixels.shape[:2]
    rounded = round_padding(tuple(int(p) for p in pad), width, height)
    if rounded != tuple(pad):
        notes.append(f"outpaint padding {tuple(pad)} rounded to {rounded} so the canvas "
                     f"({width + rounded[0] + rounded[2]}x{height + rounded[1] + rounded[3]}) is a multiple of 16")
    canvas = _pad(pixels, rounded, fill)
    original = _pad(np.ones((height, width), np.float32), rounded) > 0
    distance = ndimage.distance_transform_edt(~original)  # pixels to the nearest original pixel
    soft = 1 - np.exp(-distance / (decay * max(rounded)))
    hard = (~original).astype(np.float32)
    if repaint is not None:  # a mask on the original repaints there too
        user = _pad(repaint, rounded)
        soft, hard = np.maximum(soft, user), np.maximum(hard, user)
    soft, hard = _quantize(_blur(soft, mask_blur)), _quantize(_blur(hard, mask_blur))
    keep = np.where(original, 1 - hard, 0)  # a blur feathers into the image; the padding is never kept
    return EditCanvas(canvas, soft, keep, (canvas.shape[1], canvas.shape[0]), notes, rounded)


def noised(x0: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """The flow's x_t = t noise + (1 - t) x0."""
    return t * noise + (1 - t) * x0


def latent_mask(mask: np.ndarray, downsample: int, device) -> Tensor:
    """(H, W) pixel mask -> (1, 1, H/8, W/8): the mean of each 8 x 8 block."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.avg_pool2d(m, downsample).to(device)


def inpaint(inner, mask: Tensor, known: Tensor, noise: Tensor, t_start: float) -> ModeDenoiser:
    """Keep the `known` latents where the mask is below the differential-diffusion threshold t / t_start: they
    enter the model re-noised to t (with the starting `noise`), and the prediction there is `known` itself."""
    def predict(x: Tensor, t: Tensor, evaluate) -> tuple[Tensor, ...]:
        repaint = mask >= float(t) / t_start
        outputs = evaluate(inner, torch.where(repaint, x, noised(known, noise, t)))
        return tuple(torch.where(repaint, o, known) for o in outputs)
    return ModeDenoiser(predict)
