"""The app factory and `serve()`: wires the worker, the websocket hub, the two APIs and the web page.

`create_app(config)` builds a FastAPI app whose lifespan starts the worker (loading the model first, so the first
request is ready) and, on shutdown, lets the running job finish while pending ones are cancelled and recorded.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from . import a1111, comfy
from .auth import TokenAuth, check_host
from .catalog import Catalog
from .files import FileError, Folders
from .graph import Executor, GraphError
from .hub import Hub
from .jobs import Worker

log = logging.getLogger("chromaflow.server")
PAGE = Path(__file__).parent / "web" / "index.html"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8188
    model: str = "default"
    token: str | None = None
    allow_remote: bool = False
    base_dir: str = "."  # holds output/, input/, temp/, models/
    max_queue: int = 100
    max_pixels: int = 2048 * 2048  # width x height x batch of one job
    max_upload_mb: float = 20.0
    shutdown_grace: float = 30.0  # seconds the running job gets to finish at shutdown

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class Server:
    """Everything the routes share."""

    def __init__(self, config: ServerConfig, pipe=None):
        self.config = self.limits = config
        self.folders = Folders(config.base_dir)
        self.catalog = Catalog(self.folders, config.model, pipe)
        self.hub = Hub()
        self.worker = Worker(config.max_queue, on_change=self._status)
        self.executor = Executor()
        self.history = comfy.History()
        self.options = {"samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1}

    def _status(self) -> None:
        self.hub.emit("status", {"status": {"exec_info": {"queue_remaining": self.worker.remaining()}}})

    def _track(self, job, pipe, info) -> None:
        job.step, job.steps = info.step + 1, info.steps
        x0 = info.x0[:1]
        job.preview = lambda: pipe.decode(x0)[0]

    def on_step(self, ctx, pipe, info) -> None:
        """A ComfyUI sampler step: progress to the job's client, a binary preview if it asked for them."""
        self._track(ctx.job, pipe, info)
        sid = ctx.job.entry[3].get("client_id")
        self.hub.emit("progress", {"value": info.step + 1, "max": info.steps, "prompt_id": ctx.job.id,
                                   "node": ctx.node_id}, sid)
        if sid in self.hub.previews:
            self.hub.preview(comfy.preview_png(ctx.job.preview()), sid)

    def on_a1111_step(self, job, pipe, info) -> bool:
        self._track(job, pipe, info)
        return not job.interrupt.is_set()


def create_app(config: ServerConfig | None = None, pipe=None) -> FastAPI:
    """The ASGI app. `pipe` serves an already loaded pipeline under the name config.model (tests)."""
    config = config or ServerConfig()
    check_host(config.host, config.token, config.allow_remote)
    server = Server(config, pipe)

    @asynccontextmanager
    async def lifespan(app):
        server.hub.loop = asyncio.get_running_loop()
        if pipe is None:
            log.info("loading model %s", config.model)
            await asyncio.to_thread(server.catalog.pipeline, config.model)
        server.worker.start()
        yield
        cancelled = await asyncio.to_thread(server.worker.shutdown, config.shutdown_grace)
        if cancelled:
            log.warning("shutdown cancelled %d pending job(s): %s", len(cancelled), ", ".join(j.id for j in cancelled))

    app = FastAPI(title="chromaflow", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.server = server

    @app.exception_handler(GraphError)
    async def graph_error(request: Request, e: GraphError):
        return JSONResponse(e.body, status_code=400)

    @app.exception_handler(FileError)
    async def file_error(request: Request, e: FileError):
        return JSONResponse({"error": str(e), "detail": str(e)}, status_code=e.status)

    @app.exception_handler(a1111.BadRequest)
    async def bad_request(request: Request, e: a1111.BadRequest):
        return a1111.bad_request_response(e)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    comfy_routes = comfy.router(server)
    app.include_router(comfy_routes)
    app.include_router(comfy_routes, prefix="/api")
    app.include_router(a1111.router(server))
    if config.token:
        app.add_middleware(TokenAuth, token=config.token)
    return app


def serve(config: ServerConfig) -> None:
    import uvicorn
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_graceful_shutdown=5)
