"""The A1111 / Forge-compatible API under /sdapi/v1: txt2img, img2img (with mask), progress, interrupt, options
(model switching), the name lists and png-info. Unknown request fields are ignored, as A1111 does; a field we
read but cannot use is a 422 naming it. Generation requests wait for their turn in the shared job queue."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image, PngImagePlugin
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..engine import sampling
from ..formats.png import image_settings, infotext
from .jobs import Cancelled, Job, Rejected


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


_SAMPLER_LABEL, _SCHEDULER_LABEL = sampling.A1111_SAMPLER_LABELS, sampling.A1111_SCHEDULER_LABELS
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _number(req: dict, key: str, kind, lo=None, hi=None, default=None):
    value = req.get(key)
    if value is None:
        return default
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        value = kind(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"{key} must be in [{lo}, {hi}], got {value}")
    return value


def decode_image(data, field: str) -> Image.Image:
    """A base64 image, with or without a data: URL prefix."""
    if not isinstance(data, str) or not data:
        raise BadRequest(f"{field} must be a base64-encoded image")
    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=False)
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image
    except (binascii.Error, ValueError, OSError) as e:
        raise BadRequest(f"{field} is not a readable base64 image ({e})") from None


def generation_args(server, req: dict, img2img: bool) -> dict:
    """Translate an A1111 request into pipeline keywords (the model's defaults fill what is not given)."""
    if not isinstance(req, dict):
        raise BadRequest("the body must be a JSON object")
    args = dict(prompt=str(req.get("prompt") or ""), negative_prompt=str(req.get("negative_prompt") or ""),
                width=_number(req, "width", int, 16, 16384), height=_number(req, "height", int, 16, 16384),
                steps=_number(req, "steps", int, 1, 10000), cfg=_number(req, "cfg_scale", float, 0, 100),
                batch_size=_number(req, "batch_size", int, 1, 64, 1) * _number(req, "n_iter", int, 1, 64, 1))
    seed = _number(req, "seed", int, -1, 2**63 - 1, -1)
    args["seed"] = None if seed == -1 else seed
    for key in ("width", "height"):
        if args[key] is not None and args[key] % 16:
            raise BadRequest(f"{key} must be a multiple of 16 for this model, got {args[key]}")
    try:
        name = req.get("sampler_name") or req.get("sampler_index")
        args["sampler"] = sampling.resolve_sampler(name)[0] if name else None
        scheduler = req.get("scheduler")
        args["scheduler"] = sampling.resolve_scheduler(scheduler) if scheduler else None
        if name and args["scheduler"] is None:
            args["scheduler"] = sampling.resolve_sampler(name)[1]  # "DPM++ 2M Karras"
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if img2img:
        images = req.get("init_images") or []
        if not images:
            raise BadRequest("Init image not found: init_images is empty", 404)
        image = decode_image(images[0], "init_images[0]").convert("RGB")
        args.update(image=image, strength=_number(req, "denoising_strength", float, 0, 1, 0.75))
        if req.get("mask"):
            mask = decode_image(req["mask"], "mask").convert("L").resize(image.size)
            if req.get("inpainting_mask_invert"):
                mask = Image.eval(mask, lambda v: 255 - v)
            args.update(mask=mask, mask_blur=_number(req, "mask_blur", float, 0, 64, 4.0))
    size = (args["width"] or (args.get("image").width if img2img else 0),
            args["height"] or (args.get("image").height if img2img else 0))
    if size[0] * size[1] * args["batch_size"] > server.limits.max_pixels:
        raise BadRequest(f"{size[0]}x{size[1]} x {args['batch_size']} images is above this server's limit of "
                         f"{server.limits.max_pixels} pixels (--max-pixels)")
    model = (req.get("override_settings") or {}).get("sd_model_checkpoint")
    args["model"] = server.catalog.current if not model else model_name(server, model)
    return args


def model_name(server, title: str) -> str:
    """A checkpoint title ("name [hash]") or name -> the catalog name."""
    name = re.sub(r"\s*\[[^\]]*\]$", "", str(title))
    if name not in server.catalog.list("checkpoints"):
        raise BadRequest(f"unknown model {title!r}; GET /sdapi/v1/sd-models lists them")
    return name


def png_b64(image: Image.Image, settings: dict, index: int) -> str:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext(settings, index))
    info.add_text("chromaflow", json.dumps(image_settings(settings, index), ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def info_json(settings: dict, count: int, pipe_name: str, denoise) -> str:
    texts = [infotext(settings, i) for i in range(count)]
    seeds = [settings["seed"] + i for i in range(count)]
    return json.dumps({
        "prompt": settings["prompt"], "all_prompts": [settings["prompt"]] * count,
        "negative_prompt": settings["negative_prompt"], "all_negative_prompts": [settings["negative_prompt"]] * count,
        "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": settings["width"], "height": settings["height"],
        "sampler_name": _SAMPLER_LABEL.get(settings["sampler"], settings["sampler"]),
        "scheduler": _SCHEDULER_LABEL.get(settings["scheduler"], settings["scheduler"]),
        "cfg_scale": settings["cfg"], "steps": settings["steps"], "batch_size": count, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": pipe_name, "sd_model_hash": settings.get("model_hash"),
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": denoise, "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"chromaflow {__version__}",
        "interrupted": bool(settings.get("interrupted"))})


def parse_infotext(text: str) -> dict:
    """A1111's `parameters` text -> {"Prompt", "Negative prompt", key: value, "Size-1", "Size-2"}."""
    *head, last = text.strip().split("\n")
    found = _PARAM.findall(last)
    if len(found) < 3:
        head, found = head + [last], []
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in found:
        value = json.loads(value) if value.startswith('"') else value
        size = re.match(r"^(\d+)x(\d+)$", value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return out


def router(server) -> APIRouter:
    r = APIRouter(prefix="/sdapi/v1")

    async def generate(request: Request, img2img: bool):
        try:
            req = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        args = generation_args(server, req, img2img)

        def run(job: Job):
            pipe = server.catalog.pipeline(args["model"])
            kwargs = {k: v for k, v in args.items() if k != "model"}
            result = pipe(progress=False, callback=lambda info: server.on_a1111_step(job, pipe, info), **kwargs)
            return pipe, result

        job = Job(run, "a1111")
        try:
            server.worker.submit(job)
        except Rejected as e:
            raise BadRequest(str(e), 503) from None
        try:
            pipe, result = await asyncio.wrap_future(job.future)
        except Cancelled as e:
            raise BadRequest(str(e), 503) from None
        except ValueError as e:  # the pipeline refused a value
            raise BadRequest(str(e)) from None
        s, n = result.settings, len(result.images)
        images = await run_in_threadpool(lambda: [png_b64(im, s, i) for i, im in enumerate(result.images)])
        parameters = {k: v for k, v in req.items() if k not in ("init_images", "mask")}
        return {"images": images, "parameters": parameters,
                "info": info_json(s, n, args["model"], s.get("strength"))}

    @r.post("/txt2img")
    async def txt2img(request: Request):
        return await generate(request, False)

    @r.post("/img2img")
    async def img2img(request: Request):
        return await generate(request, True)

    @r.get("/progress")
    async def progress(skip_current_image: bool = False):
        job = server.worker.running
        count = len(server.worker.pending()) + (job is not None)
        state = {"skipped": False, "interrupted": bool(job and job.interrupt.is_set()), "stopping_generation": False,
                 "job": job.id if job else "", "job_count": count, "job_timestamp": "0", "job_no": 0,
                 "sampling_step": job.step if job else 0, "sampling_steps": job.steps if job else 0}
        if job is None or not job.steps:
            return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
        done = job.step / job.steps
        elapsed = time.time() - (job.started or time.time())
        image = None
        if not skip_current_image and job.preview is not None:
            preview = job.preview
            image = await run_in_threadpool(lambda: _b64(preview()))
        return {"progress": done, "eta_relative": elapsed / done - elapsed if done else 0, "state": state,
                "current_image": image, "textinfo": f"step {job.step}/{job.steps}"}

    @r.post("/interrupt")
    async def interrupt():
        server.worker.interrupt()
        return {}

    @r.post("/skip")
    async def skip():
        server.worker.interrupt()
        return {}

    @r.get("/samplers")
    async def samplers():
        return [{"name": _SAMPLER_LABEL.get(name, name), "aliases": [name], "options": {}}
                for name in sampling.SAMPLERS]

    @r.get("/schedulers")
    async def schedulers():
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1,
                 "need_inner_model": False}] + [
            {"name": name, "label": _SCHEDULER_LABEL.get(name, name.title()), "aliases": None, "default_rho": -1,
             "need_inner_model": False} for name in sampling.SCHEDULERS]

    @r.get("/sd-models")
    async def sd_models():
        return [model_entry(server, name) for name in server.catalog.list("checkpoints")]

    @r.get("/options")
    async def get_options():
        entry = model_entry(server, server.catalog.current)
        return {**server.options, "sd_model_checkpoint": entry["title"], "sd_checkpoint_hash": entry["sha256"]}

    @r.post("/options")
    async def set_options(request: Request):
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object of settings")
        if "sd_model_checkpoint" in body:
            name = model_name(server, body.pop("sd_model_checkpoint"))
            job = Job(lambda job: server.catalog.switch(name), "control")
            try:
                server.worker.submit(job)
                await asyncio.wrap_future(job.future)  # loads between jobs, on the worker
            except (Rejected, Cancelled) as e:
                raise BadRequest(str(e), 503) from None
        server.options.update(body)
        return None

    @r.post("/png-info")
    async def png_info(request: Request):
        body = json.loads(await request.body() or b"{}")
        image = decode_image(body.get("image") if isinstance(body, dict) else None, "image")
        items = dict(getattr(image, "text", {}) or image.info)
        text = items.pop("parameters", "")
        items = {k: v for k, v in items.items() if isinstance(v, str)}
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    @r.get("/scripts")
    async def scripts():
        return {"txt2img": [], "img2img": []}

    @r.get("/cmd-flags")
    async def cmd_flags():
        return {"api": True, "listen": server.config.host not in ("127.0.0.1", "localhost", "::1")}

    @r.get("/memory")
    async def memory():
        return {"ram": {}, "cuda": {}}

    @r.get("/embeddings")
    async def embeddings():
        return {"loaded": {}, "skipped": {}}

    @r.get("/loras")
    async def loras():
        return [{"name": n.rsplit(".", 1)[0], "alias": n.rsplit(".", 1)[0], "path": n, "metadata": {}}
                for n in server.catalog.list("loras")]

    for route in ("upscalers", "latent-upscale-modes", "hypernetworks", "face-restorers", "realesrgan-models",
                  "prompt-styles", "sd-vae", "sd-modules"):
        r.add_api_route(f"/{route}", _empty_list, methods=["GET"])

    for route in ("refresh-checkpoints", "refresh-vae", "unload-checkpoint", "reload-checkpoint"):
        r.add_api_route(f"/{route}", _empty_dict, methods=["POST"])
    return r


async def _empty_list():
    return []


async def _empty_dict():
    return {}


def model_entry(server, name: str) -> dict:
    pipe_hash = server.catalog.hashes().get(name) or ""
    return {"title": f"{name} [{pipe_hash}]" if pipe_hash else name, "model_name": name, "hash": pipe_hash or None,
            "sha256": pipe_hash or None, "filename": name, "config": None}


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bad_request_response(e: BadRequest) -> JSONResponse:
    return JSONResponse({"error": type(e).__name__, "detail": str(e), "errors": str(e)}, status_code=e.status)
