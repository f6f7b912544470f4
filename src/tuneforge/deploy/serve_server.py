"""The process side of `tuneforge serve`: the FastAPI app (serve_api.py) on uvicorn, on a socket bound here (so a
taken port is a located error, and port 0 picks a free one), with the batcher's worker thread (serve_batch.py)."""

from __future__ import annotations

import threading
import time

from tuneforge.deploy.serve_api import build_app
from tuneforge.deploy.serve_batch import Batcher


class Server:
    """`run()` blocks (the command); `start()` / `stop()` run it in a thread (tests, benchmarks). `sock`: a socket
    from bind() (the command binds before loading the model, so a taken port fails fast)."""

    def __init__(self, served, *, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8,
                 wait_ms: float = 10.0, default_max_tokens: int = 256, api_key: str | None = None,
                 allow_adapter_loading: bool = False, threads: int | None = None, sock=None):
        import uvicorn

        self.batcher = Batcher(served, max_batch_size=max_batch_size, wait_ms=wait_ms,
                               default_max_tokens=default_max_tokens, threads=threads)
        self.socket = sock if sock is not None else bind(host, port)
        self.host, self.port = host, self.socket.getsockname()[1]
        app = build_app(served, self.batcher, api_key=api_key, allow_adapter_loading=allow_adapter_loading)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        self.batcher.start()
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.batcher.stop()
            self.socket.close()

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread = threading.Thread(target=self.run, name="tuneforge-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


def bind(host: str, port: int):
    import socket

    from tuneforge.deploy.serve import ServeError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", where="--host/--port",
                         fix="choose another --port (or stop the program that holds it)") from None
    return sock
