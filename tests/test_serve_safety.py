"""``fewstep serve``'s safe defaults over real HTTP and WebSockets on a loopback port: WebSockets only from its
own page's origin (or ``--allow-origin``), requests only with a loopback ``Host``, the security headers on every
response, a token when bound beyond loopback, uploads decoded off the event loop (``/api/stats`` answers while
they are pending), and every hostile message answered with one line on a connection that stays open."""

import base64
import http.client
import io
import json
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import MODELS, running_server

websockets = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed

from fewstep.serve.security import Policy, normalize_origin, split_host

ALLOWED = "http://allowed.example:8000"
STATIC = Path(__file__).resolve().parents[1] / "src" / "fewstep" / "serve" / "static"


@pytest.fixture(scope="module")
def server():
    with running_server("--model", str(MODELS / "emoji-lcm"), "--allow-origin", ALLOWED) as (url, proc, lines):
        yield url, int(url.rstrip("/").rsplit(":", 1)[1]), lines


def request(port: int, path: str, host: str | None = None, headers: dict | None = None):
    """GET ``path`` from 127.0.0.1:``port`` with the ``Host`` header ``host``: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host or f"127.0.0.1:{port}")
    for key, value in (headers or {}).items():
        conn.putheader(key, value)
    conn.endheaders()
    response = conn.getresponse()
    out = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return out


def handshake(port: int, host: str | None = None, query: str = "", **kwargs) -> tuple[str, object]:
    """Open the WebSocket (to 127.0.0.1:``port`` whatever ``host`` says): ("hello", socket) or ("closed", code)."""
    host = host or f"127.0.0.1:{port}"
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        ws = websockets.connect(f"ws://{host}/ws{query}", sock=sock, open_timeout=30, max_size=None, **kwargs)
        message = json.loads(ws.recv(timeout=30))
    except ConnectionClosed as e:
        return "closed", (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, "")
    assert message["type"] == "hello"
    return "hello", ws


def test_origins_and_allowed_names_parse_strictly():
    assert normalize_origin("HTTP://LocalHost:80/") == "http://localhost"
    assert normalize_origin("http://[::1]:7860") == "http://[::1]:7860"
    for bad in ("null", "evil.example", "http://a.example/page", "ftp://a.example", "http://user@a.example", ""):
        assert normalize_origin(bad) is None, bad
    assert split_host("[::1]:7860") == ("[::1]", 7860) and split_host("LOCALHOST") == ("localhost", None)
    assert Policy.for_server("127.0.0.1", 7860).hosts == {"127.0.0.1", "localhost", "[::1]"}
    assert Policy.for_server("0.0.0.0", 7860, token="a-long-token").hosts is None


def test_websockets_only_from_the_pages_own_origin_or_an_allowed_one(server):
    url, port, lines = server
    for origin in (f"http://127.0.0.1:{port}", ALLOWED, None):     # the page's own; --allow-origin; no Origin (a script)
        kind, ws = handshake(port, origin=origin)
        assert kind == "hello", (origin, ws)
        ws.close()
    for origin in ("http://evil.example", "null", f"http://localhost:{port}", f"https://127.0.0.1:{port}",
                   f"http://127.0.0.1:{port + 1}"):
        assert handshake(port, origin=origin) == ("closed", (1008, "origin not allowed")), origin
    assert any("refused: a WebSocket from origin 'http://evil.example'" in line for line in lines)


def test_only_a_loopback_host_is_answered(server):
    url, port, _ = server
    for path in ("/", "/api/info", "/api/stats", "/app.js", "/favicon.ico"):
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", "127.0.0.1"):
            status, _, body = request(port, path, host)
            assert status == 403 and body.decode().count("\n") == 1 and "is not this server" in body.decode(), \
                (path, host, status, body)
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"LOCALHOST:{port}"):
            assert request(port, path, host)[0] == 200, (path, host)
    assert handshake(port, host=f"evil.example:{port}") == ("closed", (1008, "host not allowed"))
    assert handshake(port, host=f"evil.example:{port}", origin=f"http://evil.example:{port}")[0] == "closed"


def test_every_response_carries_the_security_headers(server):
    url, port, _ = server
    for path, host, status in [("/", None, 200), ("/app.js", None, 200), ("/api/info", None, 200),
                               ("/favicon.svg", None, 200), ("/nothing-here", None, 404), ("/", "evil.example", 403)]:
        got, headers, _ = request(port, path, host)
        assert got == status, path
        csp = headers["content-security-policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "img-src 'self' data: blob:",
                          "frame-ancestors 'none'", "connect-src 'self'"):
            assert directive in csp, (path, csp)
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
    assert f"ws://127.0.0.1:{port}" in request(port, "/")[1]["content-security-policy"]
    assert request(port, "/favicon.svg")[1]["content-type"].startswith("image/svg+xml")


def test_the_page_needs_nothing_its_policy_forbids():
    """No inline script, handler or style in the page (CSP: script-src/style-src 'self'), nothing eval-like in its
    script; the browser test checks Chromium reports no CSP violation."""
    html = (STATIC / "index.html").read_text()
    assert all(not body.strip() for body in re.findall(r"<script[^>]*>(.*?)</script>", html, re.S))
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/app.js">']
    assert not re.search(r"\son[a-z]+\s*=|\sstyle\s*=|<style|javascript:", html, re.I)
    script = (STATIC / "app.js").read_text()
    assert not re.search(r"\beval\(|new Function|setTimeout\(\s*[\"'`]|\.innerHTML\s*=\s*[^\"\s]", script)


def test_beyond_loopback_the_token_is_required():
    token = "test-token-8c1f"
    with running_server("--model", str(MODELS / "digits-cd"), "--host", "0.0.0.0", "--token", token) as (url, _, lines):
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        assert any(f"?token={token}" in line for line in lines)
        for path in ("/", "/api/info", "/app.js"):
            status, _, body = request(port, path)
            assert status == 403 and b"needs its token" in body
            assert request(port, path, headers={"Authorization": "Bearer wrong-token"})[0] == 403
        status, headers, _ = request(port, f"/?token={token}", host="my-machine.lan:1234")    # any Host, with the token
        assert status == 200 and f"fewstep_token_{port}={token}" in headers["set-cookie"]
        assert "httponly" in headers["set-cookie"].lower() and "samesite=strict" in headers["set-cookie"].lower()
        assert request(port, "/api/info", headers={"Cookie": f"fewstep_token_{port}={token}"})[0] == 200
        assert request(port, "/api/stats", headers={"Authorization": f"Bearer {token}"})[0] == 200
        assert handshake(port) == ("closed", (1008, "token required"))
        kind, ws = handshake(port, query=f"?token={token}")
        assert kind == "hello"
        ws.close()
        kind, ws = handshake(port, additional_headers={"Cookie": f"fewstep_token_{port}={token}"},
                             origin=f"http://127.0.0.1:{port}")
        assert kind == "hello"
        ws.close()


def tiny_big_png(seed: int) -> str:
    """A 2048×2048 PNG of a few KB (one colour): cheap to send, costly to decode."""
    buf = io.BytesIO()
    Image.new("RGB", (2048, 2048), (seed % 256, 80, 160)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_uploads_are_decoded_off_the_event_loop(server):
    """Many 2048² uploads in flight: /api/stats answers while they are being decoded (it reports them pending),
    each answer within a generous liveness bound, and every upload is then answered."""
    url, port, _ = server
    clients = [handshake(port)[1] for _ in range(8)]
    images = [tiny_big_png(i) for i in range(len(clients))]
    seen, slowest, sent, stop = [], 0.0, 0, threading.Event()

    def upload_rounds() -> None:
        nonlocal sent
        while not stop.is_set() and sent < 400:
            for ws, image in zip(clients, images):
                ws.send(json.dumps({"type": "generate", "id": sent, "prompt": "red apple", "image": image,
                                    "strength": 0.5, "seed": sent}))
                sent += 1
    sender = threading.Thread(target=upload_rounds)
    sender.start()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and not seen:
            started = time.monotonic()
            status, _, body = request(port, "/api/stats")
            slowest = max(slowest, time.monotonic() - started)
            assert status == 200
            if json.loads(body)["reading"] > 0:
                seen.append(json.loads(body)["reading"])
    finally:
        stop.set()
        sender.join()
    assert seen, "/api/stats never answered while an upload was being decoded"
    assert slowest < 20, slowest            # liveness, not speed: on the loop, decodes would queue ahead of it
    for ws in clients:                      # every client still served (its newest request wins)
        ws.send(json.dumps({"type": "generate", "id": 10_000, "prompt": "dog face"}))
        while (reply := json.loads(ws.recv(timeout=120)))["id"] != 10_000:
            assert reply["type"] == "result" or "busy" in reply, reply
        assert reply["type"] == "result"
        ws.close()


HOSTILE = [
    ('{"type": "generate", "id": 1, "prompt": "\\ud800 apple"}', "lone UTF-16 surrogate"),
    ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ('{"type": "generate", "id": 2, "loras": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
    ('{"type": "generate", "id": 3, "steps": "4"}', "steps must be an integer"),
    ('{"type": "generate", "id": 4, "seed": ' + "7" * 4000 + "}", "seed must be in 0..4294967295"),
    ('{"type": "generate", "id": 5, "image": "data:image/png;base64,' + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"x" * 64)
     .decode() + '"}', "could not be read as a PNG, JPEG or WebP image"),
    ('{"type": "generate", "id": 6, "image": "data:image/jpeg;base64,' + base64.b64encode(b"\xff\xd8\xff" + b"\0" * 64)
     .decode() + '"}', "could not be read"),
    ('"just a string"', "expected a JSON object"),
    ('{"type": "generate", "id": 7, "prompt": ["red", "apple"]}', "prompt must be a string"),
]


def test_hostile_messages_get_one_line_each_and_the_connection_stays(server):
    url, port, lines = server
    kind, ws = handshake(port)
    for text, message in HOSTILE:
        ws.send(text)
        reply = json.loads(ws.recv(timeout=30))
        assert reply["type"] == "error" and message in reply["error"], (text[:50], reply)
        assert "\n" not in reply["error"] and not re.search(r"internal error|0x[0-9a-f]{6}|BytesIO|Traceback",
                                                            reply["error"]), reply
    ws.send(b"\x00\x01binary")
    assert "JSON text frames" in json.loads(ws.recv(timeout=30))["error"]
    ws.send(json.dumps({"type": "generate", "id": 99, "prompt": "red apple \U0001f34e"}))
    while (reply := json.loads(ws.recv(timeout=60)))["id"] != 99:
        pass
    assert reply["type"] == "result"
    ws.close()
    log = "".join(lines)
    assert "Traceback" not in log and "internal error" not in log and "RecursionError" not in log, log[-3000:]
