"""Who may talk to the board: local by default; a non-local address only with --allow-remote AND --token, and then
every request carries the token. Local boards also refuse requests whose Host header is not a local name (a web page
elsewhere cannot reach 127.0.0.1 through DNS rebinding), and every POST must be JSON (a cross-site form cannot send
that without the browser asking first)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import re

from tuneforge.board.state import BoardError

TOKEN_COOKIE = "tuneforge_board_token"
TOKEN_HEADER = "x-tuneforge-token"
MIN_TOKEN_CHARS = 16


def is_local_host(host: str) -> bool:
    """True for loopback addresses and `localhost`; False for anything reachable from another machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, allow_remote: bool, token: str | None) -> None:
    """Refuse to listen on a non-local address unless both --allow-remote and a --token were given."""
    fix = 'e.g. --token "$(python -c \'import secrets; print(secrets.token_urlsafe(24))\')"'
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise BoardError(f"--token is {len(token)} characters; use at least {MIN_TOKEN_CHARS} random ones", fix=fix)
    if token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]+", token):
        raise BoardError("--token: use letters, digits and - _ . ~ only (it travels in a URL and a cookie)", fix=fix)
    if is_local_host(host):
        return
    missing = [flag for flag, given in (("--allow-remote", allow_remote), ("--token", token)) if not given]
    if missing:
        raise BoardError(f"--host {host} is not a local address: anyone who can reach it could start runs on this "
                         f"machine; refusing without {' and '.join(missing)}",
                         fix="keep the default --host 127.0.0.1 (reach it through an SSH tunnel: ssh -L 8765:127.0.0.1:"
                         "8765 host), or pass both --allow-remote and --token SECRET")


def _host_name(header: str) -> str:
    """The name in a Host header without its port: "127.0.0.1:8765" -> "127.0.0.1", "[::1]:8765" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return ""


def _cookie(scope, name: str) -> str:
    from http.cookies import SimpleCookie

    cookies = SimpleCookie()
    try:
        cookies.load(_header(scope, b"cookie"))
    except Exception:  # a malformed cookie header: no token from it
        return ""
    return cookies[name].value if name in cookies else ""


class GuardMiddleware:
    """ASGI middleware in front of every route: the token (when the board has one), the Host check (local boards)
    and JSON-only POSTs (testserver is the name FastAPI's TestClient uses). A `?token=` in a page URL sets a
    same-site cookie, so the page's own requests carry it."""

    def __init__(self, app, *, token: str | None, local: bool):
        self.app = app
        self.token = token
        self.local = local

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem, status = self._refusal(scope)
        if problem:
            return await _send_json(send, status, {"error": problem})
        query_token = self._query_token(scope)
        if self.token and query_token and scope["method"] == "GET":
            async def send_with_cookie(message):
                if message["type"] == "http.response.start":
                    cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict"
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
                await send(message)

            return await self.app(scope, receive, send_with_cookie)
        return await self.app(scope, receive, send)

    def _query_token(self, scope) -> str:
        from urllib.parse import parse_qs

        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        return values[0] if values else ""

    def _refusal(self, scope) -> tuple[str | None, int]:
        if self.local:
            host = _host_name(_header(scope, b"host"))
            if not (is_local_host(host) or host == "testserver"):
                return (f"this board answers only local requests (Host {host!r} is not a local name); open it as "
                        "http://127.0.0.1:PORT/", 403)
        if self.token:
            given = (_header(scope, TOKEN_HEADER.encode()) or _cookie(scope, TOKEN_COOKIE) or self._query_token(scope))
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return ("this board needs its access token: open the address printed when it started "
                        "(http://HOST:PORT/?token=...), or send the X-Tuneforge-Token header", 401)
        if scope["method"] not in ("GET", "HEAD"):
            kind = _header(scope, b"content-type").split(";")[0].strip().lower()
            if kind != "application/json":
                return "requests that change anything must send JSON (Content-Type: application/json)", 415
        return None, 200


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
