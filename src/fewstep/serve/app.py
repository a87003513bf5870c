"""The ASGI app of ``fewstep serve`` (Starlette on uvicorn): the page, its info, and one WebSocket per client.

Routes: ``GET /`` the page, ``GET /app.js`` and ``GET /style.css`` its script and style (read from the package
when the app is built: no path from a request ever reaches the file system), ``GET /api/info`` the model's
ranges and LoRA sliders, ``GET /api/stats`` the engine's throughput and latency, ``WS /ws`` the stream
(:mod:`fewstep.serve.protocol`). Each connection reads requests and sends results concurrently: a result is
sent the moment it is ready, a superseded request is dropped silently, a bad one answered with an error
line; what a client has not yet read is bounded (the oldest undelivered message goes first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from concurrent.futures import CancelledError, Future
from pathlib import Path

from ..errors import FewstepError
from .batching import Cancelled
from .engine import Busy, Engine
from .protocol import ProtocolError, parse, to_json

STATIC = Path(__file__).with_name("static")
PAGES = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/style.css": ("style.css", "text/css; charset=utf-8")}
OUTBOX = 16                       # undelivered messages kept per client
MAX_MESSAGE = 8 * 1024 * 1024     # bytes of one WebSocket frame (uvicorn closes the connection beyond it)
log = logging.getLogger("fewstep.serve")


def build_app(engine: Engine):
    """The Starlette app serving ``engine``."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route, WebSocketRoute

    files = {route: (STATIC / name).read_bytes() for route, (name, _) in PAGES.items()}

    def page(request):
        path = request.url.path
        return Response(files[path], media_type=PAGES[path][1], headers={"Cache-Control": "no-cache"})

    async def info(request):
        return JSONResponse(engine.info)

    async def stats(request):
        return JSONResponse(engine.stats())

    async def stream(websocket):
        await Connection(engine, websocket).run()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    routes = [Route(path, page) for path in PAGES] + [Route("/api/info", info), Route("/api/stats", stats),
                                                      WebSocketRoute("/ws", stream)]
    return Starlette(routes=routes, lifespan=lifespan)


class Connection:
    """One client: its reader (requests → engine) and its writer (results, errors → client)."""

    def __init__(self, engine: Engine, websocket) -> None:
        self.engine, self.ws = engine, websocket
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
                self._handle(message.get("text"))
        except WebSocketDisconnect:
            pass
        finally:
            self.engine.cancel(self)
            writer.cancel()

    def _handle(self, text: str | None) -> None:
        try:
            request = parse(text, self.engine.info)
            future = self.engine.submit(self, request)
        except ProtocolError as e:
            self.post({"type": "error", "id": e.request_id, "error": str(e)})
            return
        except Busy as e:
            self.post({"type": "error", "id": request.id, "error": str(e)})
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
        except Exception as e:  # a bug: logged with its traceback, the client told, the server keeps serving
            log.exception("request %s failed", request_id)
            self.post({"type": "error", "id": request_id, "error": f"internal error: {type(e).__name__}: {e}"})
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


def serve(engine: Engine, sock: socket.socket, log_level: str = "warning") -> None:
    """Run the app on ``sock`` until interrupted."""
    import uvicorn

    config = uvicorn.Config(build_app(engine), log_level=log_level, ws_max_size=MAX_MESSAGE, lifespan="on",
                            timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[sock])
