"""The board's web application: the page (plain HTML/JS/CSS from board/static/, nothing from a CDN), the JSON API
(recipe_api.py, runs_api.py), the guard in front of both (security.py), and errors as messages: a user's mistake is
a 4xx with the same text the CLI prints, a bug a 500 that says so (its traceback goes to the board's terminal)."""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge.board.state import BoardError, BoardState

STATIC = Path(__file__).resolve().parent / "static"
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-src 'self'; "
            "frame-ancestors 'self'; form-action 'none'; base-uri 'none'")
log = logging.getLogger("tuneforge.board")


def create_app(state: BoardState):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from tuneforge.board import recipe_api, runs_api
    from tuneforge.board.jobs import Jobs
    from tuneforge.board.security import GuardMiddleware
    from tuneforge.errors import TuneforgeError

    if state.jobs is None:
        state.jobs = Jobs(state)
    app = FastAPI(title="tuneforge board", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.board = state

    @app.exception_handler(TuneforgeError)
    async def user_error(request: Request, exc: TuneforgeError):
        status = exc.status if isinstance(exc, BoardError) else 400
        return JSONResponse({"error": exc.render(), "problems": getattr(exc, "problems", None)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "bad request: " + "; ".join(problems)}, status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("tuneforge board: unexpected error on %s", request.url.path)
        return JSONResponse({"error": f"internal error in tuneforge board ({type(exc).__name__}: {exc}); the board's "
                                      "terminal has the details -- please report it"}, status_code=500)

    @app.middleware("http")
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        return response

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"})

    @app.get("/api/health")
    def health():
        from tuneforge import __version__

        return {"ok": True, "version": __version__, "runs_dir": str(state.runs_dir)}

    app.include_router(recipe_api.router(state))
    app.include_router(runs_api.router(state))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return GuardMiddleware(app, token=state.token, local=not state.remote)
