"""``fewstep serve`` as a process, over HTTP and WebSockets: it binds to loopback, serves only its own page
files, answers every bad message with one clear error and keeps serving, survives 50 concurrent clients and
clients that leave mid-request with bounded memory, and the newest request of a client wins."""

import base64
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from serve_helpers import MODELS, rss_mb, running_server

websockets = pytest.importorskip("websockets.sync.client")
from websockets.exceptions import ConnectionClosed


@pytest.fixture(scope="module")
def server():
    with running_server("--model", str(MODELS / "emoji-lcm")) as (url, proc, lines):
        yield url, proc, lines


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "ws"


def connect(url: str):
    ws = websockets.connect(ws_url(url), max_size=None, open_timeout=30)
    hello = json.loads(ws.recv(timeout=30))
    assert hello["type"] == "hello"
    return ws, hello["info"]


def until(ws, request_id: int, timeout: float = 60) -> dict:
    """Read messages until one answers ``request_id``."""
    deadline = time.monotonic() + timeout
    while True:
        msg = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        if msg.get("id") == request_id:
            return msg


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def test_binds_to_loopback_and_serves_only_its_page(server):
    url, _, _ = server
    assert url.startswith("http://127.0.0.1:")
    status, page = get(url)
    assert status == 200 and b'<canvas id="sketch"' in page and b"cdn" not in page.lower()
    assert get(url + "app.js")[0] == 200 and get(url + "style.css")[0] == 200
    info = json.loads(get(url + "api/info")[1])
    assert info["model"] == "emoji-lcm" and info["text"]
    for path in ("../pyproject.toml", "static/../../pyproject.toml", "%2e%2e/%2e%2e/etc/passwd", "index.html/../app.js",
                 "models/emoji-lcm/model_index.json"):
        assert get(url + path)[0] == 404


def test_every_bad_message_gets_a_clear_error_and_the_connection_keeps_working(server):
    url, _, _ = server
    ws, _ = connect(url)
    bad = [("{oops", "not JSON"), ('{"type": "generate", "id": 1, "prompt": "' + "x" * 10_000 + '"}', "prompt too long"),
           ('{"type": "generate", "id": 2, "steps": 9}', "steps must be in 1..8"),
           ('{"type": "generate", "id": 3, "guidance_scale": -1}', "guidance_scale must be in [1, 6]"),
           ('{"type": "generate", "id": 4, "num": "many"}', "num must be an integer"),
           ('{"type": "generate", "id": 5, "image": "data:image/png;base64,' + base64.b64encode(b"MZ\x90\x00" * 64).decode()
            + '"}', "not an image"),
           ('{"type": "generate", "id": 6, "image": "data:image/png;base64,' + "A" * 3_000_000 + '"}', "image too large"),
           ('{"type": "generate", "id": 7, "prompt": "../../etc/passwd", "image": "../../etc/passwd"}', "data URL")]
    for text, message in bad:
        ws.send(text)
        reply = json.loads(ws.recv(timeout=30))
        assert reply["type"] == "error" and message in reply["error"], (text[:60], reply)
    ws.send(b"\x00binary")
    assert "JSON text frames" in json.loads(ws.recv(timeout=30))["error"]
    ws.send(json.dumps({"type": "generate", "id": 8, "prompt": "red apple", "seed": 1}))
    reply = until(ws, 8)
    assert reply["type"] == "result" and len(reply["images"]) == 1 and reply["images"][0].startswith("data:image/png")
    ws.close()


def test_a_frame_over_the_limit_closes_only_that_connection(server):
    url, _, _ = server
    ws, _ = connect(url)
    ws.send('{"type": "generate", "image": "' + "A" * (9 * 1024 * 1024) + '"}')
    with pytest.raises(ConnectionClosed):           # 1009: message too big
        for _ in range(5):
            ws.recv(timeout=30)
    ws2, _ = connect(url)
    ws2.send(json.dumps({"type": "generate", "id": 1, "prompt": "dog face"}))
    assert until(ws2, 1)["type"] == "result"
    ws2.close()


def test_the_newest_request_of_a_client_wins(server):
    url, _, _ = server
    ws, _ = connect(url)
    for i, text in enumerate(["r", "re", "red", "red ", "red a", "red ap", "red app", "red appl", "red apple"], 1):
        ws.send(json.dumps({"type": "generate", "id": i, "prompt": text, "num": 4, "steps": 8, "seed": 77}))
    last = until(ws, 9)
    assert last["type"] == "result" and len(last["images"]) == 4
    ws.close()


def test_fifty_clients_and_clients_that_leave_mid_request(server):
    url, proc, lines = server
    ws, _ = connect(url)                 # warm: the first request loads everything lazily loaded
    ws.send(json.dumps({"type": "generate", "id": 1, "prompt": "warm up"}))
    until(ws, 1)
    before = rss_mb(proc.pid)
    outcomes, errors = [], []

    def client(i: int) -> None:
        try:
            c, _ = connect(url)
            for k in range(3):
                c.send(json.dumps({"type": "generate", "id": k, "prompt": f"emoji {i} {k}", "seed": i, "num": 1 + i % 3}))
            outcomes.append(until(c, 2, timeout=240)["type"])
            c.close()
        except Exception as e:
            errors.append(repr(e))

    def leaver(i: int) -> None:
        try:
            c, _ = connect(url)
            c.send(json.dumps({"type": "generate", "id": 1, "prompt": f"gone {i}", "num": 8, "steps": 8}))
            c.close()
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    threads += [threading.Thread(target=leaver, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert outcomes.count("result") == 50
    deadline = time.monotonic() + 30
    while json.loads(get(url + "api/stats")[1])["inflight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = json.loads(get(url + "api/stats")[1])
    assert stats["inflight"] == 0 and stats["mean_batch"] > 1
    ws.send(json.dumps({"type": "generate", "id": 2, "prompt": "still here"}))
    assert until(ws, 2)["type"] == "result"
    assert rss_mb(proc.pid) - before < 400, (before, rss_mb(proc.pid))
    assert proc.poll() is None and not any("Traceback" in line for line in lines), "".join(lines)[-2000:]
    ws.close()
