"""The ComfyUI-compatible API: /prompt, /queue, /history, /view, /upload/image, /interrupt, /object_info, the
informational routes and the /ws event stream. Mounted twice by the app: bare and under /api."""

from __future__ import annotations

import io
import json
import sys
import time
from collections import OrderedDict

import torch
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image

from .. import __version__
from .files import FileError
from .graph import Context, GraphError, Interrupted, error_report, validate
from .jobs import Job, Rejected
from .nodes import NODES

MAX_HISTORY = 10000
SENSITIVE = ("auth_token_comfy_org", "api_key_comfy_org")


def now_ms() -> int:
    return int(time.time() * 1000)


async def read_json(request: Request):
    """The body as JSON whatever the content type (clients post bytes without one); a 400 naming the problem."""
    raw = await request.body()
    try:
        return json.loads(raw) if raw.strip() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphError("invalid_json", "The request body is not valid JSON", str(e)) from None


class History:
    def __init__(self):
        self.items: OrderedDict[str, dict] = OrderedDict()

    def add(self, job: Job, outputs: dict, status: str, messages: list) -> None:
        self.items[job.id] = {"prompt": job.entry, "outputs": outputs,
                              "status": {"status_str": status, "completed": status == "success",
                                         "messages": messages},
                              "meta": {nid: {"node_id": nid, "display_node": nid, "parent_node": None,
                                             "real_node_id": nid} for nid in outputs}}
        while len(self.items) > MAX_HISTORY:
            self.items.popitem(last=False)


def comfy_job(server, prompt: dict, outputs: list[str], extra: dict, prompt_id: str | None) -> Job:
    """A job that runs a validated graph and leaves its outcome in the history, then signals completion."""
    sid = extra.get("client_id")

    def run(job: Job):
        messages = []

        def emit(kind, data):
            data = {**data, "prompt_id": job.id}
            if kind in ("execution_start", "execution_cached", "execution_success", "execution_error",
                        "execution_interrupted"):
                data.setdefault("timestamp", now_ms())
                messages.append([kind, data])
            server.hub.emit(kind, data, sid)

        ctx = Context(server, job, prompt, (extra.get("extra_pnginfo") or {}), on_step=server.on_step)
        emit("execution_start", {})
        outputs_ui, status = {}, "success"
        try:
            outputs_ui = server.executor.run(prompt, outputs, ctx, emit)
            emit("execution_success", {})
        except Interrupted:
            status = "error"
            emit("execution_interrupted", {"node_id": ctx.node_id, "node_type": prompt[ctx.node_id]["class_type"],
                                           "executed": []})
        except Exception as e:  # noqa: BLE001 - reported to the client as ComfyUI does, the worker goes on
            status = "error"
            node = prompt.get(ctx.node_id, {})
            emit("execution_error", {"node_id": ctx.node_id, "node_type": node.get("class_type"), "executed": [],
                                     **error_report(e), "current_inputs": {}, "current_outputs": {}})
        server.history.add(job, outputs_ui, status, messages)
        server.hub.emit("executing", {"node": None, "prompt_id": job.id}, sid)  # after history: done
        return outputs_ui

    def cancelled(job: Job, reason: str):
        data = {"prompt_id": job.id, "node_id": None, "node_type": None, "executed": [],
                "exception_message": reason, "exception_type": "Cancelled", "traceback": [],
                "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms()}
        server.history.add(job, {}, "error", [["execution_error", data]])
        server.hub.emit("execution_error", data, sid)
        server.hub.emit("executing", {"node": None, "prompt_id": job.id}, sid)

    job = Job(run, "comfy", on_cancel=cancelled)
    if prompt_id:
        job.id = str(prompt_id)
    job.entry = [0, job.id, prompt, extra, outputs]
    return job


def router(server) -> APIRouter:
    r = APIRouter()

    @r.post("/prompt")
    async def post_prompt(request: Request):
        try:
            body = await read_json(request)
            if not isinstance(body, dict) or "prompt" not in body:
                raise GraphError("no_prompt", "No prompt provided", "the body needs a 'prompt' object")
            prompt = body["prompt"]
            outputs, node_errors = validate(prompt, server)
        except GraphError as e:
            return JSONResponse(e.body, status_code=400)
        extra = {k: v for k, v in (body.get("extra_data") or {}).items() if k not in SENSITIVE}
        if body.get("client_id"):
            extra["client_id"] = body["client_id"]
        if body.get("prompt_id") and (str(body["prompt_id"]) in server.history.items or
                                      any(j.id == str(body["prompt_id"]) for j in server.worker.pending())):
            return JSONResponse(GraphError("invalid_prompt", "prompt_id already used",
                                           str(body["prompt_id"])).body, status_code=400)
        job = comfy_job(server, prompt, outputs, extra, body.get("prompt_id"))
        try:
            number = body.get("number")
            server.worker.submit(job, front=bool(body.get("front")), number=None if number is None else float(number))
        except (Rejected, TypeError, ValueError) as e:
            status = 503 if isinstance(e, Rejected) else 400
            return JSONResponse({"error": {"type": "queue_full" if status == 503 else "invalid_number",
                                           "message": str(e), "details": str(e), "extra_info": {}},
                                 "node_errors": {}}, status_code=status)
        job.entry[0] = job.number
        return {"prompt_id": job.id, "number": job.number, "node_errors": node_errors}

    @r.get("/prompt")
    async def get_prompt():
        return {"exec_info": {"queue_remaining": server.worker.remaining()}}

    @r.get("/queue")
    async def get_queue():
        running = server.worker.running
        return {"queue_running": [running.entry] if running is not None and running.entry else [],
                "queue_pending": [j.entry for j in server.worker.pending() if j.entry]}

    @r.post("/queue")
    async def post_queue(request: Request):
        body = await _json_or_empty(request)
        if body.get("clear"):
            server.worker.cancel(None, "cleared from the queue")
        if isinstance(body.get("delete"), list):
            server.worker.cancel({str(i) for i in body["delete"]})
        return Response()

    @r.post("/interrupt")
    async def interrupt(request: Request):
        body = await _json_or_empty(request)
        server.worker.interrupt(str(body["prompt_id"]) if body.get("prompt_id") else None)
        return Response()

    @r.get("/history")
    async def history(max_items: int | None = None, offset: int = 0):
        items = list(server.history.items.items())[offset:]
        return dict(items[:max_items] if max_items is not None else items)

    @r.get("/history/{prompt_id}")
    async def history_one(prompt_id: str):
        item = server.history.items.get(prompt_id)
        return {prompt_id: item} if item else {}

    @r.post("/history")
    async def post_history(request: Request):
        body = await _json_or_empty(request)
        if body.get("clear"):
            server.history.items.clear()
        for pid in body.get("delete") or []:
            server.history.items.pop(str(pid), None)
        return Response()

    @r.get("/view")
    async def view(filename: str, subfolder: str = "", type: str = "output"):
        for kind in ("output", "input", "temp"):  # "name.png [input]" selects the folder too
            if filename.endswith(f" [{kind}]"):
                filename, type = filename[:-len(kind) - 3], kind
        path = server.folders.resolve(type, subfolder, filename)
        if not path.is_file():
            raise FileError(404, f"no file {filename!r} in {type}/{subfolder}")
        return FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})

    @r.post("/upload/image")
    async def upload_image(request: Request):
        limit = server.limits.max_upload_bytes
        if int(request.headers.get("content-length") or 0) > limit + 65536:
            raise FileError(413, f"upload larger than this server's limit of {limit} bytes (--max-upload-mb)")
        form = await request.form(max_part_size=limit + 1)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise FileError(400, "multipart field 'image' (a file) is missing")
        data = await upload.read()
        if len(data) > limit:
            raise FileError(413, f"upload of {len(data)} bytes exceeds the limit of {limit} (--max-upload-mb)")
        overwrite = str(form.get("overwrite", "")).lower() in ("true", "1")
        return server.folders.save_image(data, upload.filename or "", str(form.get("subfolder", "")),
                                         str(form.get("type") or "input"), overwrite)

    @r.get("/object_info")
    async def object_info():
        return {name: node.info(name, server) for name, node in NODES.items()}

    @r.get("/object_info/{name}")
    async def object_info_one(name: str):
        return {name: NODES[name].info(name, server)} if name in NODES else {}

    @r.get("/system_stats")
    async def system_stats():
        ram_total, ram_free = _memory()
        devices = [{"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
                    "torch_vram_total": ram_total, "torch_vram_free": ram_free}]
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            devices = [{"name": torch.cuda.get_device_name(), "type": "cuda", "index": 0, "vram_total": total,
                        "vram_free": free, "torch_vram_total": total, "torch_vram_free": free}]
        return {"system": {"os": sys.platform, "ram_total": ram_total, "ram_free": ram_free,
                           "comfyui_version": f"chromaflow {__version__}", "required_frontend_version": None,
                           "installed_templates_version": None, "required_templates_version": None,
                           "python_version": sys.version, "pytorch_version": torch.__version__,
                           "embedded_python": False, "argv": sys.argv}, "devices": devices}

    @r.get("/models")
    async def models():
        from .catalog import FOLDERS
        return list(FOLDERS)

    @r.get("/models/{folder}")
    async def models_in(folder: str):
        return server.catalog.list(folder)

    @r.get("/embeddings")
    async def embeddings():
        return [n.rsplit(".", 1)[0] for n in server.catalog.list("embeddings")]

    @r.get("/features")
    async def features():
        return {"supports_preview_metadata": False, "max_upload_size": server.limits.max_upload_bytes}

    @r.get("/extensions")
    async def extensions():
        return []

    @r.post("/free")
    async def free(request: Request):
        return Response()

    @r.websocket("/ws")
    async def ws(websocket: WebSocket, clientId: str | None = None, preview: str | None = None):
        await server.hub.serve(websocket, {"status": {"exec_info": {"queue_remaining": server.worker.remaining()}}},
                               clientId, preview in ("1", "true"))

    return r


async def _json_or_empty(request: Request) -> dict:
    """ComfyUI treats a missing or invalid body of these control routes as empty."""
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _memory() -> tuple[int, int]:
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        kb = lambda key: int(info[key].split()[0]) * 1024  # noqa: E731
        return kb("MemTotal"), kb("MemAvailable")
    except (OSError, KeyError, ValueError):
        return 0, 0


def preview_png(image: Image.Image, size: int = 256) -> bytes:
    image = image.copy()
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
