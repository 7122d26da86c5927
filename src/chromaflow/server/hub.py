"""Websocket fan-out: the worker thread emits ComfyUI events, each socket gets them in order.

Each connection owns an asyncio queue drained by one sender task, so events from the worker thread (scheduled
onto the event loop with call_soon_threadsafe) keep their order per client. Binary preview frames go only to
sockets that asked for them (`/ws?preview=1`): comfy-api-simplified treats any binary frame as a result image.
"""

from __future__ import annotations

import asyncio
import struct
import uuid

from fastapi import WebSocket, WebSocketDisconnect


class Hub:
    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: dict[str, asyncio.Queue] = {}
        self.previews: set[str] = set()

    def emit(self, kind: str, data: dict, sid: str | None = None) -> None:
        """Send {"type", "data"} to client `sid`, or to everyone when sid is None or not connected (ComfyUI's rule
        for jobs without a client id). Safe from any thread."""
        self._post(sid, {"type": kind, "data": data})

    def preview(self, png: bytes, sid: str | None) -> None:
        """A binary preview frame: u32 BE event type 1 (preview image), u32 BE format 2 (PNG), then the image."""
        self._post(sid, struct.pack(">II", 1, 2) + png, binary=True)

    def _post(self, sid, message, binary: bool = False) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._put, sid, message, binary)

    def _put(self, sid, message, binary) -> None:
        targets = [sid] if sid in self.queues else list(self.queues)
        for target in targets:
            if not binary or target in self.previews:
                self.queues[target].put_nowait(message)

    async def serve(self, ws: WebSocket, first: dict, sid: str | None, preview: bool) -> None:
        """Run one connection: the initial status, then events until the client leaves. A reconnect with the same
        client id replaces the old socket."""
        await ws.accept()
        sid = sid or uuid.uuid4().hex
        queue = self.queues[sid] = asyncio.Queue()
        if preview:
            self.previews.add(sid)
        await ws.send_json({"type": "status", "data": {**first, "sid": sid}})

        async def send():
            while True:
                message = await queue.get()
                await (ws.send_bytes(message) if isinstance(message, bytes) else ws.send_json(message))

        sender = asyncio.create_task(send())
        try:
            while True:
                message = await ws.receive_json()
                if isinstance(message, dict) and message.get("type") == "feature_flags":
                    queue.put_nowait({"type": "feature_flags", "data": {"supports_preview_metadata": False}})
        except (WebSocketDisconnect, ValueError, RuntimeError):
            pass
        finally:
            sender.cancel()
            if self.queues.get(sid) is queue:
                del self.queues[sid]
                self.previews.discard(sid)
