"""The dashboard's web app: the page, JSON endpoints over the run directories, live curves over server-sent
events, and a relay from the chat pane to a running ``tuneforge serve``.

Starlette + uvicorn, the page plain HTML/JS with uPlot vendored in ``static/``: nothing is fetched from a
network at install or run time. It reads run directories and never writes in them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuneforge.errors import TuneforgeError
from tuneforge.log import get_logger
from tuneforge.ui import runs

try:  # optional dependency: pip install 'tuneforge[ui]'
    import uvicorn
    from markdown_it import MarkdownIt
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as e:
    raise TuneforgeError(f"the dashboard needs packages that are not installed ({e}): "
                         "pip install 'tuneforge[ui]'") from e

logger = get_logger(__name__)
STATIC = Path(__file__).parent / "static"
COOKIE = "tuneforge_ui_token"
HEARTBEAT_S = 15.0


def create_app(runs_dir: Path, token: str | None = None, serve_url: str = "http://127.0.0.1:8000",
               poll_s: float = 0.5) -> Starlette:
    """The ASGI app over ``runs_dir``; with ``token`` every request must carry it (header, cookie or ?token=)."""
    root = Path(runs_dir)
    markdown = MarkdownIt("js-default")  # raw HTML in a report stays text

    def run_of(request: Request) -> Path:
        run_dir = runs.run_dir_of(root, request.query_params.get("run", ""))
        if run_dir is None:
            raise NotFound(f"no run {request.query_params.get('run')!r} under {root}")
        return run_dir

    async def index(request: Request) -> Response:
        response = FileResponse(STATIC / "index.html")
        if token and request.query_params.get("token"):  # the URL printed at start-up: remember it
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response

    def list_runs(request: Request) -> Response:  # file reads: Starlette runs it in a thread
        found = runs.find_runs(root)
        return JSONResponse({"root": str(root), "serve_url": serve_url,
                             "runs": [runs.summarize(root, d) for d in found]})

    def run_detail(request: Request) -> Response:
        return JSONResponse(runs.run_detail(root, run_of(request)))

    def run_file(request: Request) -> Response:
        path = runs.shown_file(run_of(request), request.query_params.get("path", ""))
        if path is None:
            raise NotFound(f"no such file in the run: {request.query_params.get('path')!r}")
        if path.suffix == ".md":
            return JSONResponse({"html": markdown.render(path.read_text(encoding="utf-8"))})
        return FileResponse(path)

    def compare(request: Request) -> Response:
        names = request.query_params.getlist("run")
        dirs = [runs.run_dir_of(root, n) for n in names]
        missing = [n for n, d in zip(names, dirs, strict=True) if d is None]
        if missing:
            raise NotFound(f"no run {missing[0]!r} under {root}")
        return JSONResponse({"runs": [runs.summarize(root, d) for d in dirs],
                             "diff": runs.config_diff([runs.read_config(d) for d in dirs]),
                             "evals": [[vars(t) for t in runs.eval_tables(d)] for d in dirs]})

    async def stream(request: Request) -> Response:
        return StreamingResponse(metric_events(run_of(request), poll_s), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def chat_models(request: Request) -> Response:
        url = chat_url(request.query_params.get("url", serve_url))
        try:
            body = await asyncio.to_thread(fetch_json, f"{url}/v1/models", request.query_params.get("key"))
        except OSError as e:
            return unreachable(url, e)
        return JSONResponse(body)

    async def chat(request: Request) -> Response:
        body = await request.json()
        url = chat_url(body.pop("url", serve_url))
        key = body.pop("key", None)
        try:
            lines = await asyncio.to_thread(open_stream, f"{url}/v1/chat/completions", body | {"stream": True}, key)
        except urllib.error.HTTPError as e:
            return Response(e.read(), status_code=e.code, media_type="application/json")
        except OSError as e:
            return unreachable(url, e)
        return StreamingResponse(lines, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    routes = [Route("/", index), Route("/api/runs", list_runs), Route("/api/run", run_detail),
              Route("/api/file", run_file), Route("/api/compare", compare), Route("/api/stream", stream),
              Route("/api/chat/models", chat_models), Route("/api/chat", chat, methods=["POST"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    middleware = [Middleware(TokenCheck, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={NotFound: not_found})


def serve_ui(runs_dir: Path, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
             serve_url: str = "http://127.0.0.1:8000") -> None:
    """Serve the dashboard until Ctrl-C."""
    if not Path(runs_dir).is_dir():
        raise TuneforgeError(f"runs directory {runs_dir} does not exist; pass --runs DIR (the folder your "
                             "runs' output_dir is in), or start a run with `tuneforge train`")
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        logger.warning("serving the dashboard on %s without a token; anyone who can reach it can read your runs "
                       "(pass --token or bind to 127.0.0.1)", host)
    url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    logger.info("dashboard over %s at %s (Ctrl-C stops)", runs_dir, url)
    uvicorn.run(create_app(Path(runs_dir), token, serve_url), host=host, port=port, log_level="warning")


class NotFound(Exception):
    """A run or file the request names does not exist (a 404 with the reason)."""


async def not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": str(exc)}, status_code=404)


class TokenCheck:
    """Every request carries the token: ``Authorization: Bearer``, the page's cookie, or ``?token=``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app, self.expected = app, token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            header = request.headers.get("authorization", "")
            given = (header[7:] if header.startswith("Bearer ") else "") or request.cookies.get(COOKIE, "") \
                or request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), self.expected):  # constant time
                response = JSONResponse({"error": "missing or wrong token: open the URL `tuneforge ui` printed "
                                                  "(it ends in ?token=...)"}, status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def metric_events(run_dir: Path, poll_s: float) -> AsyncIterator[str]:
    """SSE: every record of ``metrics.jsonl`` so far, then new ones as they are written, until the run ends."""
    path, offset, records, idle = run_dir / "metrics.jsonl", 0, [], 0.0
    first = True
    while True:
        new, offset = runs.read_records(path, offset)
        records += new
        status = runs.run_status(run_dir, records)
        if new or first:
            yield f"data: {json.dumps({'records': new, 'reset': first, 'status': status['status']})}\n\n"
            first, idle = False, 0.0
        if status["status"] != "running":
            yield f"event: end\ndata: {json.dumps(status)}\n\n"
            return
        await asyncio.sleep(poll_s)
        idle += poll_s
        if idle >= HEARTBEAT_S:  # a comment line keeps proxies from closing a quiet stream
            yield ": ping\n\n"
            idle = 0.0


def chat_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise NotFound(f"not a server URL: {url!r}; give the address `tuneforge serve` printed, "
                       "e.g. http://127.0.0.1:8000")
    return url.rstrip("/").removesuffix("/v1")


def _request(url: str, key: str | None, body: dict | None = None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    return urllib.request.Request(url, data=data, headers=headers)


def fetch_json(url: str, key: str | None) -> Any:
    with urllib.request.urlopen(_request(url, key), timeout=10) as r:
        return json.loads(r.read())


def open_stream(url: str, body: dict, key: str | None) -> Iterator[bytes]:
    """POST ``body`` and relay the server's SSE lines as they arrive (Starlette iterates this in a thread)."""
    response = urllib.request.urlopen(_request(url, key, body), timeout=120)

    def lines() -> Iterator[bytes]:
        with response:
            yield from response
    return lines()


def unreachable(url: str, error: Exception) -> Response:
    return JSONResponse({"error": f"cannot reach {url} ({error}); start a server with `tuneforge serve --model "
                                  "MODEL --adapters runs/` and connect to the address it prints"}, status_code=502)
