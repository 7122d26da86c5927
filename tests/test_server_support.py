"""Shared by the server tests: run the real app under uvicorn on a free port, in a thread, with the tiny model.

(Named test_server_*.py to sit with the server tests; it defines no tests itself.)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from chromaflow.server import ServerConfig, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp_path, **options):
    """Yield (base_url, app) for a live server on 127.0.0.1 serving the tiny random model from `tmp_path`."""
    config = ServerConfig(port=free_port(), model="tiny", base_dir=str(tmp_path), **options)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}", app
    finally:
        server.should_exit = True
        thread.join(30)
