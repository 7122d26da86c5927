"""`chromaflow serve`: an HTTP server that is a drop-in back end for ComfyUI and A1111/Forge API clients, plus a
small web page. One worker thread owns the model; every interface only translates requests into pipeline calls.

Modules: app (factory, lifespan, uvicorn), jobs (queue + worker), hub (websocket fan-out), auth (token, host
guard), files (input/output/temp folders, safe paths, uploads), catalog (model files and loaded pipelines),
nodes (the ComfyUI node registry), graph (validation and cached execution), comfy / a1111 (the two APIs).
"""

from .app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
