"""Access control: an optional shared token on every route, and a guard against exposing an open server.

With --token, each HTTP request and websocket must carry `Authorization: Bearer <token>` or `?token=<token>`
(the form ComfyUI-Login users already script against). Binding a non-loopback address without a token is
refused unless --allow-remote says it is meant: an open server on a network runs anyone's jobs.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from urllib.parse import parse_qs

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, token: str | None, allow_remote: bool) -> None:
    if not is_loopback(host) and not token and not allow_remote:
        raise ValueError(f"refusing to listen on {host} without --token: anyone who can reach it could run jobs "
                         f"and read outputs. Pass --token SECRET (clients send 'Authorization: Bearer SECRET' or "
                         f"?token=SECRET), or --allow-remote if the network is trusted.")


class TokenAuth:
    """ASGI middleware: 401 (HTTP) or a refused handshake (websocket) without the token."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    def _allowed(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        given = auth[7:] if auth.lower().startswith("bearer ") else None
        if given is None:
            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [None])[0]
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "token required"})
            return
        body = json.dumps({"error": "unauthorized", "detail": "this server needs a token: send "
                           "'Authorization: Bearer <token>' or add ?token=<token>"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
