"""The ASGI app of ``fewstep serve`` (Starlette on uvicorn): the page, its info, and one WebSocket per client.

Routes: ``GET /`` the page, ``GET /app.js``, ``GET /style.css`` and ``GET /favicon.svg`` (also as
``/favicon.ico``) its script, style and icon (read from the package when the app is built: no path from a
request ever reaches the file system), ``GET /api/info`` the model's ranges and LoRA sliders, ``GET /api/stats``
the engine's throughput and latency, ``WS /ws`` the stream (:mod:`fewstep.serve.protocol`). In front of all of
them, :class:`fewstep.serve.security.Guard` checks Host, Origin and the token and adds the security headers.

Each connection reads requests and sends results concurrently: a message is checked (and its image decoded)
in a small thread pool, never on the event loop, so one upload stalls no one; a result is sent the moment it
is ready, a superseded request is dropped silently, a bad one answered with one error line and the connection
kept; what a client has not yet read is bounded (the oldest undelivered message goes first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import FewstepError
from .batching import Cancelled
from .engine import Busy, Engine
from .protocol import MAX_UPLOAD, ProtocolError, Request, parse, to_json
from .security import Guard, Policy

STATIC = Path(__file__).with_name("static")
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/style.css": ("style.css", "text/css; charset=utf-8"), "/favicon.svg": ("favicon.svg", "image/svg+xml"),
         "/favicon.ico": ("favicon.svg", "image/svg+xml")}
OUTBOX = 16                       # undelivered messages kept per client
# Bytes of one WebSocket frame: room for a MAX_UPLOAD image as base64 and the rest of a request; beyond it uvicorn
# closes that connection with 1009 (message too big), the one refusal that does not keep the connection.
MAX_MESSAGE = max(4 * 1024 * 1024, MAX_UPLOAD * 4 // 3 + 64 * 1024)
READERS = 2                       # threads checking messages and decoding uploads, shared by every client
log = logging.getLogger("fewstep.serve")


class Reader:
    """Checks clients' messages (:func:`fewstep.serve.protocol.parse`, which decodes uploads) in a small thread
    pool, off the event loop; ``pending`` counts the messages in it (reported in ``/api/stats``)."""

    def __init__(self, workers: int = READERS) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="fewstep-read")
        self.pending = 0

    async def parse(self, text: str, info: dict) -> Request:
        """``parse(text, info)`` in the pool; its :class:`ProtocolError` (or any other error) re-raised here."""
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, parse, text, info)
        finally:
            self.pending -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def build_app(engine: Engine, policy: Policy | None = None):
    """The Starlette app serving ``engine`` behind :class:`~fewstep.serve.security.Guard` with ``policy`` (default:
    loopback names on any port, no extra origins, no token)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute

    files = {route: (STATIC / name).read_bytes() for route, (name, _) in PAGES.items()}
    reader = Reader()

    def page(request):
        path = request.url.path
        return Response(files[path], media_type=PAGES[path][1], headers={"Cache-Control": "no-cache"})

    async def info(request):
        return JSONResponse(engine.info)

    async def stats(request):
        return JSONResponse({**engine.stats(), "reading": reader.pending})

    async def stream(websocket):
        await Connection(engine, websocket, reader).run()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        reader.close()
        engine.close()

    routes = [Route(path, page) for path in PAGES] + [Route("/api/info", info), Route("/api/stats", stats),
                                                      WebSocketRoute("/ws", stream)]
    return Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(Guard, policy=policy or Policy())])


class Connection:
    """One client: its reader (requests → checked off the event loop → engine) and its writer (results, errors →
    client)."""

    def __init__(self, engine: Engine, websocket, reader: Reader) -> None:
        self.engine, self.ws, self.reader = engine, websocket, reader
        self.outbox: asyncio.Queue = asyncio.Queue()

    def post(self, message: dict) -> None:
        while self.outbox.qsize() >= OUTBOX:
            self.outbox.get_nowait()
        self.outbox.put_nowait(message)

    async def run(self) -> None:
        from starlette.websockets import WebSocketDisconnect

        await self.ws.accept()
        self.post({"type": "hello", "info": self.engine.info})
        writer = asyncio.create_task(self._write())
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self._handle(message.get("text"))
        except WebSocketDisconnect:
            pass
        finally:
            self.engine.cancel(self)
            writer.cancel()

    async def _handle(self, text: str | None) -> None:
        """Check one message off the event loop and submit it; every refusal is one error line on the socket."""
        if text is None:
            self.post({"type": "error", "id": None, "error": "send JSON text frames, not binary ones"})
            return
        try:
            request = await self.reader.parse(text, self.engine.info)
        except ProtocolError as e:
            self.post({"type": "error", "id": e.request_id, "error": str(e)})
            return
        except Exception as e:   # a message parse() did not foresee: the client told, one line logged, no traceback
            log.warning("fewstep serve: a message could not be read (%s)", type(e).__name__)
            self.post({"type": "error", "id": None, "error": "malformed message: it could not be read"})
            return
        try:
            future = self.engine.submit(self, request)
        except Busy as e:
            self.post({"type": "error", "id": request.id, "error": str(e), "busy": True})
            return
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(self._deliver, request.id, f))

    def _deliver(self, request_id: int | None, future: Future) -> None:
        if future.cancelled():
            return
        try:
            result = future.result()
        except (Cancelled, CancelledError):
            return
        except FewstepError as e:
            self.post({"type": "error", "id": request_id, "error": str(e)})
            return
        except Exception:  # a bug of the server's (a request was checked): its traceback logged, the client told
            log.exception("request %s failed", request_id)
            self.post({"type": "error", "id": request_id, "error": "the server failed on this request (its log says "
                                                                      "why); try other settings"})
            return
        self.post({"type": "result", "id": request_id, **result, "stats": self.engine.stats()})

    async def _write(self) -> None:
        while True:
            message = await self.outbox.get()
            try:
                await self.ws.send_text(to_json(message))
            except Exception:   # the client went away mid-send; the reader sees the disconnect
                return


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one); a port in use is one clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise FewstepError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port "
                           f"(0 picks a free one)") from None
    sock.listen(128)
    return sock


def serve(engine: Engine, sock: socket.socket, policy: Policy | None = None, log_level: str = "warning") -> None:
    """Run the app on ``sock`` under ``policy`` until interrupted."""
    import uvicorn

    config = uvicorn.Config(build_app(engine, policy), log_level=log_level, ws_max_size=MAX_MESSAGE, lifespan="on",
                            timeout_graceful_shutdown=2, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
