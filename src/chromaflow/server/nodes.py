"""The ComfyUI node registry: each node is data (ComfyUI's input names, types, defaults and ranges, served by
/object_info and checked by graph.validate) plus a few lines that call the library.

Values passed between nodes are light references, so the graph stays cheap to cache and one pipeline call does
the work: MODEL / CLIP / VAE name what to load (the catalog loads it on the worker), CONDITIONING is the text
with its CLIP, a LATENT is a dict {"samples", "width", "height", "batch_size"} that may also carry the source
images ("pixels", for img2img), a "noise_mask" (inpainting) and the "images" / "settings" its sampler decoded,
IMAGE is a list of PIL images, MASK a float array (B, H, W). Samplers and schedulers are ours, under ComfyUI's
names (engine.sampling); ComfyUI sampler names we do not implement are not offered.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..engine import sampling
from ..engine.schedules import flux_mu
from ..formats.png import save_png
from ..pipeline.edit import to_pixels
from ..pipeline.pipeline import latents_to_pil

MAX_RES = 16384
SEED_MAX = 2**64 - 1


# --- input specs (ComfyUI's /object_info encoding) --------------------------------------------------------------
def INT(default, lo=0, hi=MAX_RES, step=1, **extra):
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, **extra})


def FLOAT(default, lo=0.0, hi=100.0, step=0.01, **extra):
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, **extra})


def STRING(default="", multiline=False):
    return ("STRING", {"default": default, "multiline": multiline, **({"dynamicPrompts": True} if multiline else {})})


def COMBO(options, **extra):
    """A choice; `options` is a list or a function of the server (file lists change while it runs)."""
    return (options, extra)


def SEED(**extra):
    return INT(0, 0, SEED_MAX, control_after_generate=True, **extra)


SAMPLER_NAMES = list(sampling.SAMPLERS)
SCHEDULER_NAMES = list(sampling.SCHEDULERS)
UPSCALE = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
_PIL_FILTERS = {"nearest-exact": Image.NEAREST, "bilinear": Image.BILINEAR, "area": Image.BOX,
                "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


@dataclass
class Node:
    fn: Callable  # fn(ctx, **inputs) -> tuple of outputs, or {"ui": ..., "result": (...)}
    required: dict
    outputs: tuple = ()
    optional: dict = field(default_factory=dict)
    output_names: tuple | None = None
    output_node: bool = False
    category: str = "chromaflow"
    display: str | None = None
    hidden: dict = field(default_factory=dict)
    check: Callable | None = None  # check(limits, inputs) -> error message or None (custom_validation_failed)

    def info(self, name: str, server) -> dict:
        resolve = lambda spec: ((spec[0](server) if callable(spec[0]) else spec[0]), spec[1])  # noqa: E731
        inputs = {"required": {k: resolve(v) for k, v in self.required.items()}}
        if self.optional:
            inputs["optional"] = {k: resolve(v) for k, v in self.optional.items()}
        if self.hidden:
            inputs["hidden"] = self.hidden
        return {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items() if k != "hidden"},
                "output": list(self.outputs), "output_is_list": [False] * len(self.outputs),
                "output_name": list(self.output_names or self.outputs), "name": name,
                "display_name": self.display or name, "description": (self.fn.__doc__ or "").strip(),
                "python_module": "chromaflow.server.nodes", "category": self.category,
                "output_node": self.output_node, "deprecated": False, "experimental": False}


# --- values -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Model:
    name: str
    shift: float | None = None  # None: Flux's resolution-dependent shift
    loras: tuple = ()  # ((name, strength), ...)


@dataclass(frozen=True)
class Clip:
    name: str
    type: str = "chroma"


@dataclass(frozen=True)
class Conditioning:
    text: str
    clip: Clip


@dataclass(frozen=True)
class Guider:
    model: Model
    positive: Conditioning
    negative: Conditioning | None
    cfg: float


@dataclass(frozen=True)
class Sigmas:
    model: Model
    scheduler: str
    steps: int
    denoise: float


# --- the one sampling call every sampler node makes -------------------------------------------------------------
def _sample(ctx, model: Model, positive: Conditioning, negative: Conditioning | None, latent: dict, seed: int | None,
            steps: int, cfg: float, sampler: str, scheduler: str, denoise: float = 1.0,
            last_step: int | None = None) -> tuple[dict]:
    """Run the pipeline for a LATENT: txt2img for an empty latent, img2img (strength = denoise) for encoded
    pixels, inpainting when it has a noise mask. `last_step` stops early (KSamplerAdvanced's end_at_step)."""
    pipe = ctx.catalog.pipeline(model.name, positive.clip.name, None, model.loras)
    edit = {}
    if latent.get("pixels") is not None:
        image = latent["pixels"][0]
        edit = dict(image=image, strength=denoise)
        if latent.get("noise_mask") is not None:
            mask = Image.fromarray((np.clip(latent["noise_mask"][0], 0, 1) * 255).astype(np.uint8))
            edit["mask"] = mask.resize(image.size, Image.BILINEAR)
    cap = steps if last_step is None else min(steps, last_step)
    result = pipe(positive.text, negative_prompt=negative.text if negative else "", width=latent["width"],
                  height=latent["height"], steps=steps, cfg=cfg, seed=seed, sampler=sampler, scheduler=scheduler,
                  shift=model.shift, batch_size=latent["batch_size"], progress=False,
                  callback=ctx.step_callback(pipe, stop_after=cap), **edit)
    ctx.raise_if_interrupted()
    return ({**latent, "samples": result.latents, "pixels": None, "images": result.images,
             "settings": result.settings, "vae": model.name},)


def ksampler(ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
    """Denoise a latent with a model and positive / negative conditioning."""
    return _sample(ctx, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise)


def ksampler_advanced(ctx, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative,
                      latent_image, start_at_step, end_at_step, return_with_leftover_noise):
    """KSampler with a step range: start_at_step maps to img2img strength, end_at_step stops early (the result is
    the model's clean estimate at that step; leftover noise is not returned)."""
    denoise = 1.0 - min(start_at_step, steps) / steps
    return _sample(ctx, model, positive, negative, latent_image, noise_seed if add_noise == "enable" else 0, steps,
                   cfg, sampler_name, scheduler, denoise, last_step=end_at_step)


def sampler_custom_advanced(ctx, noise, guider, sampler, sigmas, latent_image):
    """Sample with separately chosen noise, guider, sampler and schedule."""
    (latent,) = _sample(ctx, guider.model, guider.positive, guider.negative, latent_image, noise, sigmas.steps,
                        guider.cfg, sampler, sigmas.scheduler, sigmas.denoise)
    return latent, latent


# --- loaders and conditioning -----------------------------------------------------------------------------------
def unet_loader(ctx, unet_name, weight_dtype):
    """Load a diffusion model (the built-in model is listed first)."""
    ctx.catalog.path("diffusion_models", unet_name)  # 404 now rather than at sampling
    return (Model(unet_name),)


def clip_loader(ctx, clip_name, type, device="default"):
    """Load a text encoder; Chroma uses type 'chroma' (T5 only)."""
    ctx.catalog.path("text_encoders", clip_name)
    return (Clip(clip_name, type),)


def vae_loader(ctx, vae_name):
    """Load a VAE (the built-in model's own is listed first)."""
    ctx.catalog.path("vae", vae_name)
    return (vae_name,)


def t5_options(ctx, clip, min_padding, min_length):
    """Accepted for Chroma graphs; our encoder always applies Chroma's rule (real tokens + one pad visible)."""
    return (clip,)


def encode(ctx, text, clip):
    """Text conditioning (encoded when the sampler runs; the pipeline caches encodings)."""
    return (Conditioning(text, clip),)


def lora_model_only(ctx, model, lora_name, strength_model):
    """Apply a LoRA to the diffusion model."""
    return (replace(model, loras=model.loras + ((lora_name, strength_model),)),)


def model_sampling_flux(ctx, model, max_shift, base_shift, width, height):
    """Fix Flux's resolution-dependent shift for a size: shift = e^mu(tokens)."""
    tokens = (width // 16) * (height // 16)
    return (replace(model, shift=math.exp(flux_mu(tokens, base_shift=base_shift, max_shift=max_shift))),)


def model_sampling_shift(ctx, model, shift):
    """A fixed SD3-style timestep shift."""
    return (replace(model, shift=shift),)


def cfg_guider(ctx, model, positive, negative, cfg):
    return (Guider(model, positive, negative, cfg),)


def basic_guider(ctx, model, conditioning):
    return (Guider(model, conditioning, None, 1.0),)


def basic_scheduler(ctx, model, scheduler, steps, denoise):
    return (Sigmas(model, scheduler, steps, denoise),)


def empty_latent(ctx, width, height, batch_size):
    """An empty latent of a size (the pipeline draws its noise per image from seed + i)."""
    return ({"samples": None, "width": width, "height": height, "batch_size": batch_size},)


# --- images ---------------------------------------------------------------------------------------------------
def _vae(ctx, name: str):
    return ctx.catalog.pipeline(name).vae


def vae_decode(ctx, samples, vae):
    """Latents to images. A sampler's own decode is reused when it used the same VAE."""
    if samples.get("images") is not None and samples.get("vae") == vae:
        images = samples["images"]
    elif samples.get("samples") is None:
        raise ValueError("this latent has no samples yet: sample it (KSampler) before decoding")
    else:
        v = _vae(ctx, vae)
        images = latents_to_pil(v.decode(samples["samples"].to(next(v.parameters()).dtype)))
    for image in images:
        image.info["settings"] = samples.get("settings")
    return (images,)


def vae_encode(ctx, pixels, vae):
    """Images to latents; the images ride along so a sampler can run img2img on them."""
    v = _vae(ctx, vae)
    d = 16  # the pipeline's packing multiple: crop like ComfyUI crops to the VAE's
    w, h = pixels[0].width // d * d, pixels[0].height // d * d
    cropped = [im.convert("RGB").crop((0, 0, w, h)) for im in pixels]
    x = torch.stack([torch.from_numpy(to_pixels(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in cropped])
    with torch.no_grad():
        samples = v.encode(x.to(next(v.parameters()).dtype))
    return ({"samples": samples, "width": w, "height": h, "batch_size": len(cropped), "pixels": cropped},)


def set_noise_mask(ctx, samples, mask):
    return ({**samples, "noise_mask": mask},)


def load_image(ctx, image):
    """An image from input/ (upload with /upload/image); MASK = 1 - alpha."""
    path = ctx.folders.resolve("input", "", image)
    with Image.open(path) as im:
        im.load()
        rgb = im.convert("RGB")
        alpha = np.asarray(im.convert("RGBA"))[..., 3].astype(np.float32) / 255 if "A" in im.getbands() else None
    mask = (1 - alpha) if alpha is not None else np.zeros((rgb.height, rgb.width), np.float32)
    return ([rgb], mask[None])


def image_scale(ctx, image, upscale_method, width, height, crop):
    """Resize; width or height 0 keeps the aspect ratio."""
    out = []
    for im in image:
        w = width or max(1, round(im.width * height / im.height))
        h = height or max(1, round(im.height * width / im.width))
        if crop == "center":  # crop to the target aspect first
            scale = max(w / im.width, h / im.height)
            cw, ch = round(w / scale), round(h / scale)
            left, top = (im.width - cw) // 2, (im.height - ch) // 2
            im = im.crop((left, top, left + cw, top + ch))
        out.append(im.resize((w, h), _PIL_FILTERS[upscale_method]))
    return (out,)


def _save(ctx, images, prefix: str, kind: str) -> dict:
    """Write PNGs with ComfyUI's `prompt` / `workflow` chunks (and our `parameters` when the settings are known)."""
    text = {"prompt": json.dumps(ctx.prompt)}
    for key, value in (ctx.extra_pnginfo or {}).items():
        text[key] = json.dumps(value)
    subfolder, _, stem = prefix.replace("\\", "/").rpartition("/")
    folder = ctx.folders.resolve(kind, subfolder, "")
    folder.mkdir(parents=True, exist_ok=True)
    counter = 1 + max((int(p.stem.rsplit("_", 2)[-2]) for p in folder.glob(f"{stem}_*_.png")
                       if p.stem.rsplit("_", 2)[-2].isdigit()), default=0)
    saved = []
    for i, image in enumerate(images):
        name = f"{stem}_{counter + i:05}_.png"
        settings = image.info.get("settings")
        save_png(image, folder / name, settings, index=i if settings else 0, extra_text=text)
        saved.append({"filename": name, "subfolder": subfolder, "type": kind})
    return {"ui": {"images": saved}, "result": ()}


def save_image(ctx, images, filename_prefix="ComfyUI"):
    """Save images to output/ (PNG with the graph in `prompt` / `workflow`)."""
    return _save(ctx, images, filename_prefix, "output")


def preview_image(ctx, images):
    """Save images to temp/ for a quick look."""
    return _save(ctx, images, f"ComfyUI_temp_{int(time.time() * 1000) % 100000:05}", "temp")


# --- checks run at validation (ComfyUI's custom_validation_failed) ----------------------------------------------
def _check_size(limits, inputs):
    w, h, b = (inputs.get(k) for k in ("width", "height", "batch_size"))
    if isinstance(w, int) and isinstance(h, int) and w * h * (b if isinstance(b, int) else 1) > limits.max_pixels:
        return (f"{w}x{h} x {b if isinstance(b, int) else 1} images is {w * h * (b or 1)} pixels, above this "
                f"server's limit of {limits.max_pixels} (--max-pixels)")
    if isinstance(w, int) and isinstance(h, int) and (w % 16 or h % 16):
        return f"width and height must be multiples of 16 for this model, got {w}x{h}"
    return None


# --- the registry ---------------------------------------------------------------------------------------------
_files = lambda folder: lambda server: server.catalog.list(folder)  # noqa: E731
_MODEL, _LATENT = ("MODEL", {}), ("LATENT", {})
_SAMPLING = dict(steps=INT(20, 1, 10000), cfg=FLOAT(8.0, 0.0, 100.0, 0.1, round=0.01),
                 sampler_name=COMBO(SAMPLER_NAMES), scheduler=COMBO(SCHEDULER_NAMES))
_LATENT_SIZE = lambda default, step: dict(width=INT(default, 16, MAX_RES, step), height=INT(default, 16, MAX_RES, step),  # noqa: E731
                                          batch_size=INT(1, 1, 4096))

NODES: dict[str, Node] = {
    "UNETLoader": Node(unet_loader, dict(unet_name=COMBO(_files("diffusion_models")),
                                         weight_dtype=COMBO(["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"])),
                       ("MODEL",), category="advanced/loaders", display="Load Diffusion Model"),
    "CLIPLoader": Node(clip_loader, dict(clip_name=COMBO(_files("text_encoders")), type=COMBO(["chroma"])),
                       ("CLIP",), optional=dict(device=COMBO(["default", "cpu"], advanced=True)),
                       category="advanced/loaders", display="Load CLIP"),
    "VAELoader": Node(vae_loader, dict(vae_name=COMBO(_files("vae"))), ("VAE",), category="loaders",
                      display="Load VAE"),
    "LoraLoaderModelOnly": Node(lora_model_only, dict(model=_MODEL, lora_name=COMBO(_files("loras")),
                                                      strength_model=FLOAT(1.0, -100.0, 100.0)),
                                ("MODEL",), category="loaders"),
    "CLIPTextEncode": Node(encode, dict(text=STRING(multiline=True), clip=("CLIP", {})), ("CONDITIONING",),
                           category="conditioning", display="CLIP Text Encode (Prompt)"),
    "T5TokenizerOptions": Node(t5_options, dict(clip=("CLIP", {}), min_padding=INT(0, 0, 10000),
                                                min_length=INT(0, 0, 10000)), ("CLIP",), category="_for_testing/conditioning"),
    "EmptyLatentImage": Node(empty_latent, _LATENT_SIZE(512, 8), ("LATENT",), category="latent",
                             display="Empty Latent Image", check=_check_size),
    "EmptySD3LatentImage": Node(empty_latent, _LATENT_SIZE(1024, 16), ("LATENT",), category="latent/sd3",
                                check=_check_size),
    "KSampler": Node(ksampler, dict(model=_MODEL, seed=SEED(), **_SAMPLING, positive=("CONDITIONING", {}),
                                    negative=("CONDITIONING", {}), latent_image=_LATENT, denoise=FLOAT(1.0, 0.0, 1.0)),
                     ("LATENT",), category="sampling"),
    "KSamplerAdvanced": Node(ksampler_advanced, dict(
        model=_MODEL, add_noise=COMBO(["enable", "disable"]), noise_seed=SEED(), **_SAMPLING,
        positive=("CONDITIONING", {}), negative=("CONDITIONING", {}), latent_image=_LATENT,
        start_at_step=INT(0, 0, 10000), end_at_step=INT(10000, 0, 10000),
        return_with_leftover_noise=COMBO(["disable", "enable"])), ("LATENT",), category="sampling"),
    "ModelSamplingFlux": Node(model_sampling_flux, dict(model=_MODEL, max_shift=FLOAT(1.15, 0.0, 100.0),
                                                        base_shift=FLOAT(0.5, 0.0, 100.0),
                                                        width=INT(1024, 16, MAX_RES, 8), height=INT(1024, 16, MAX_RES, 8)),
                              ("MODEL",), category="advanced/model"),
    "ModelSamplingSD3": Node(model_sampling_shift, dict(model=_MODEL, shift=FLOAT(3.0, 0.0, 100.0)), ("MODEL",),
                             category="advanced/model"),
    "ModelSamplingAuraFlow": Node(model_sampling_shift, dict(model=_MODEL, shift=FLOAT(1.73, 0.0, 100.0)),
                                  ("MODEL",), category="advanced/model"),
    "CFGGuider": Node(cfg_guider, dict(model=_MODEL, positive=("CONDITIONING", {}), negative=("CONDITIONING", {}),
                                       cfg=FLOAT(8.0, 0.0, 100.0, 0.1, round=0.01)), ("GUIDER",),
                      category="sampling/custom_sampling/guiders"),
    "BasicGuider": Node(basic_guider, dict(model=_MODEL, conditioning=("CONDITIONING", {})), ("GUIDER",),
                        category="sampling/custom_sampling/guiders"),
    "BasicScheduler": Node(basic_scheduler, dict(model=_MODEL, scheduler=COMBO(SCHEDULER_NAMES),
                                                 steps=INT(20, 1, 10000), denoise=FLOAT(1.0, 0.0, 1.0)),
                           ("SIGMAS",), category="sampling/custom_sampling/schedulers"),
    "KSamplerSelect": Node(lambda ctx, sampler_name: (sampler_name,), dict(sampler_name=COMBO(SAMPLER_NAMES)),
                           ("SAMPLER",), category="sampling/custom_sampling/samplers"),
    "RandomNoise": Node(lambda ctx, noise_seed: (noise_seed,), dict(noise_seed=SEED()), ("NOISE",),
                        category="sampling/custom_sampling/noise"),
    "SamplerCustomAdvanced": Node(sampler_custom_advanced, dict(noise=("NOISE", {}), guider=("GUIDER", {}),
                                                                sampler=("SAMPLER", {}), sigmas=("SIGMAS", {}),
                                                                latent_image=_LATENT),
                                  ("LATENT", "LATENT"), output_names=("output", "denoised_output"),
                                  category="sampling/custom_sampling"),
    "VAEDecode": Node(vae_decode, dict(samples=_LATENT, vae=("VAE", {})), ("IMAGE",), category="latent",
                      display="VAE Decode"),
    "VAEEncode": Node(vae_encode, dict(pixels=("IMAGE", {}), vae=("VAE", {})), ("LATENT",), category="latent",
                      display="VAE Encode"),
    "SetLatentNoiseMask": Node(set_noise_mask, dict(samples=_LATENT, mask=("MASK", {})), ("LATENT",),
                               category="latent/inpaint"),
    "LoadImage": Node(load_image, dict(image=COMBO(lambda server: server.folders.images("input"), image_upload=True)),
                      ("IMAGE", "MASK"), category="image", display="Load Image"),
    "ImageScale": Node(image_scale, dict(image=("IMAGE", {}), upscale_method=COMBO(UPSCALE),
                                         width=INT(512, 0, MAX_RES), height=INT(512, 0, MAX_RES),
                                         crop=COMBO(["disabled", "center"])), ("IMAGE",),
                       category="image/upscaling", display="Upscale Image"),
    "SaveImage": Node(save_image, dict(images=("IMAGE", {}), filename_prefix=STRING("ComfyUI")), output_node=True,
                      category="image", display="Save Image", hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}),
    "PreviewImage": Node(preview_image, dict(images=("IMAGE", {})), output_node=True, category="image",
                         display="Preview Image", hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}),
}
