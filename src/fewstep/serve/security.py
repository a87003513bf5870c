"""Who may use ``fewstep serve``: the checks on every HTTP request and WebSocket, and the headers on every response.

A page the user visits while the server runs can open ``ws://127.0.0.1:7860/ws`` (WebSockets have no same-origin
policy) and a DNS-rebinding page reaches ``/`` and ``/api/info`` under its own name. So, as one ASGI middleware
(:class:`Guard`, in front of every route):

- **Host**: the ``Host`` header must name this server as loopback (``127.0.0.1``, ``localhost``, ``[::1]`` or the
  bound loopback address) with its port. A server bound beyond loopback cannot know the names other machines use
  for it, so there any Host is taken and the token (below) is what keeps strangers out.
- **Origin** (WebSockets): must be the origin of the page the server itself serves (``http://`` + the checked
  Host) or one of ``--allow-origin``. ``null`` (sandboxed frames, ``file:`` pages) is never accepted. A handshake
  *without* an Origin is accepted: browsers always send one on WebSocket handshakes, so a missing Origin is a
  non-browser client (Python's ``websockets``, the benchmark's load generator), which any local program could be
  anyway.
- **Token** (``--token``, required by the CLI when bound beyond loopback unless ``--insecure-open``): every
  request carries it as ``?token=``, ``Authorization: Bearer``, ``X-Fewstep-Token`` or the cookie the page gets
  when it is first opened with ``?token=`` (``HttpOnly; SameSite=Strict``), compared in constant time.

A refused HTTP request is a 403 with one plain-text line; a refused WebSocket is accepted and at once closed with
code 1008 (policy violation) and a short reason, before anything is read or sent. Every HTTP response gets a
Content-Security-Policy (scripts, styles and connections from this origin only; images also ``data:`` and
``blob:``; no framing), ``X-Frame-Options: DENY``, ``X-Content-Type-Options: nosniff``, ``Referrer-Policy:
no-referrer`` and ``Cross-Origin-Resource-Policy`` / ``-Opener-Policy: same-origin``.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from ..errors import FewstepError

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{8,256}")     # URL- and cookie-safe: no encoding anywhere
SAFE_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
log = logging.getLogger("fewstep.serve")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case with a default port left out, or None when ``origin`` is not one
    (``null``, a path, a user, no host)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https") or not host or parts.path not in ("", "/") or parts.query or parts.fragment \
            or parts.username is not None or parts.password is not None:
        return None
    host = f"[{host}]" if ":" in host else host.lower()
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != DEFAULT_PORTS[scheme] else "")


def check_token(token: str) -> str:
    """``token`` if it can be a ``--token``; otherwise a :class:`FewstepError` saying what one looks like."""
    if not TOKEN_PATTERN.fullmatch(token):
        raise FewstepError("--token must be 8 to 256 characters of letters, digits and . _ ~ - (so it needs no "
                           "escaping in a URL or cookie); e.g. python -c 'import secrets; print(secrets.token_urlsafe())'")
    return token


@dataclass(frozen=True)
class Policy:
    """What :class:`Guard` accepts. ``hosts``: the names a ``Host`` header may carry (None: any, for a server
    bound beyond loopback); ``port``: the port it must carry (None: any); ``origins``: WebSocket origins
    accepted besides the page's own; ``token``: required on everything when set."""

    hosts: frozenset[str] | None = LOOPBACK_NAMES
    port: int | None = None
    origins: frozenset[str] = field(default_factory=frozenset)
    token: str | None = None

    @classmethod
    def for_server(cls, host: str, port: int, allow_origins: list[str] = (), token: str | None = None) -> "Policy":
        """The policy of a server bound to ``host:port`` (``--allow-origin`` values checked here: one clear error
        for a value that is not an origin)."""
        origins = set()
        for value in allow_origins:
            origin = normalize_origin(value)
            if origin is None:
                raise FewstepError(f"--allow-origin {value!r} is not an origin: give scheme://host[:port], e.g. "
                                   f"http://localhost:3000 (never 'null', no path)")
            origins.add(origin)
        bound = f"[{host}]" if ":" in host else host.lower()
        hosts = LOOPBACK_NAMES | {bound} if is_loopback(host) else None
        return cls(hosts=hosts, port=port, origins=frozenset(origins), token=check_token(token) if token else None)

    @property
    def cookie(self) -> str:
        """The name of the cookie the page keeps the token in (one per port: cookies ignore ports)."""
        return f"fewstep_token_{self.port or 0}"


class Refused(Exception):
    """A request the policy refuses: ``line`` for the log and the 403, ``reason`` (≤ 123 bytes) for a close frame."""

    def __init__(self, line: str, reason: str) -> None:
        super().__init__(line)
        self.line, self.reason = line, reason


def split_host(host: str) -> tuple[str, int | None]:
    """``Host`` header → (lower-case name, port or None)."""
    name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
    if not name or (name.startswith("[") != name.endswith("]")):
        name, port = host, ""
    return name.lower(), int(port) if port.isdigit() else None


class Guard:
    """ASGI middleware enforcing a :class:`Policy` and adding the security headers (module docstring)."""

    def __init__(self, app, policy: Policy) -> None:
        self.app, self.policy = app, policy
        self._logged: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        host = headers.get("host", "")
        try:
            self.check_host(host, scope)
            if scope["type"] == "websocket":
                self.check_origin(headers.get("origin"), host, scope)
            from_query = self.check_token(scope, headers)
        except Refused as refused:
            self._log(refused.line)
            if scope["type"] == "websocket":
                await _close(receive, send, refused.reason)
            else:
                await _forbidden(refused.line, self._with_headers(send, "", None))
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, self._with_headers(send, host, from_query))

    def check_host(self, host: str, scope: Scope) -> None:
        """Refuse a ``Host`` that is not this server's loopback name and port (DNS rebinding)."""
        if self.policy.hosts is None:
            return
        name, port = split_host(host)
        port = DEFAULT_PORTS.get(scope.get("scheme", "http"), 80) if port is None else port
        if name not in self.policy.hosts or (self.policy.port is not None and port != self.policy.port):
            names = ", ".join(sorted(self.policy.hosts))
            raise Refused(f"refused: Host {host[:80]!r} is not this server (it answers to {names} on port "
                          f"{self.policy.port}); open the address fewstep serve printed", "host not allowed")

    def check_origin(self, origin: str | None, host: str, scope: Scope) -> None:
        """Refuse a WebSocket from a page of another origin (a missing Origin is a non-browser client)."""
        if origin is None:
            return
        scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
        given = normalize_origin(origin)
        if given is not None and (given == normalize_origin(f"{scheme}://{host}") or given in self.policy.origins):
            return
        raise Refused(f"refused: a WebSocket from origin {origin[:80]!r}, not this server's page (--allow-origin "
                      f"adds an origin)", "origin not allowed")

    def check_token(self, scope: Scope, headers: dict[str, str]) -> bool:
        """Refuse a request without the token (when there is one); whether it came as ``?token=``."""
        token = self.policy.token
        if token is None:
            return False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [])
        bearer = headers.get("authorization", "")
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:        # a malformed Cookie header is as good as none
            cookie = SimpleCookie()
        given = [*query, bearer[7:] if bearer.lower().startswith("bearer ") else "",
                 headers.get("x-fewstep-token", ""), cookie[self.policy.cookie].value if self.policy.cookie in cookie
                 else ""]
        if any(hmac.compare_digest(g.encode("utf-8", "replace"), token.encode()) for g in given if g):
            return bool(query) and hmac.compare_digest(query[0].encode("utf-8", "replace"), token.encode())
        raise Refused("refused: this server needs its token: open the address fewstep serve printed (…/?token=…), "
                      "or send Authorization: Bearer TOKEN", "token required")

    def _with_headers(self, send: Send, host: str, set_cookie: bool | None) -> Send:
        extra = security_headers(host)
        if set_cookie:
            extra.append((b"set-cookie", f"{self.policy.cookie}={self.policy.token}; Path=/; HttpOnly; "
                                         f"SameSite=Strict".encode()))

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *[(k, v) for k, v in extra if k not in names or k == b"set-cookie"]]}
            await send(message)
        return send_with_headers

    def _log(self, line: str) -> None:
        """One log line per distinct refusal (a page retrying in a loop does not fill the log)."""
        if line in self._logged or len(self._logged) >= 256:
            return
        self._logged.add(line)
        log.warning("fewstep serve: %s", line)


def security_headers(host: str) -> list[tuple[bytes, bytes]]:
    """The headers every HTTP response carries; the WebSocket of the page's own host in ``connect-src``."""
    own = f" ws://{host} wss://{host}" if SAFE_HOST.fullmatch(host) else ""
    csp = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
           f"connect-src 'self'{own}; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return [(b"content-security-policy", csp.encode()), (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-resource-policy", b"same-origin"), (b"cross-origin-opener-policy", b"same-origin")]


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers (the first of each name), decoded as Latin-1 as HTTP defines them."""
    out: dict[str, str] = {}
    for key, value in scope.get("headers", []):
        out.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return out


async def _forbidden(line: str, send: Send) -> None:
    body = (line + "\n").encode("utf-8", "replace")
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store")]})
    await send({"type": "http.response.body", "body": body})


async def _close(receive: Receive, send: Send, reason: str) -> None:
    """Accept the handshake and close at once with 1008 (policy violation): the client sees why."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.close", "code": 1008, "reason": reason})
