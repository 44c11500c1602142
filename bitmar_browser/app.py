"""The memory browser's web application (Starlette): HTML pages rendered with autoescaping Jinja
templates, a JSON API the page's script calls, and pictures of the memory. Nothing a request
names reaches the file system: templates and static files are fixed names read at start-up.
"""
from __future__ import annotations

import inspect
import json
import math
import secrets
from datetime import datetime, timezone
from pathlib import Path

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from bitmar_core.episodes.store_api import MAX_STAMP_NS, Episode, StoreError

from .memory_view import (
    MAX_PAGE_SIZE,
    MAX_QUERY_K,
    MAX_UPLOAD_BYTES,
    MemoryView,
    ViewError,
    memory_png,
    usage_png,
)

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_PAGE_SIZE = 24
DEFAULT_K = 10
POLL_INTERVAL_S = 2.0
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
# Served with every response: even a caption that escaped escaping could run no script (only
# /static/app.js runs), load nothing from elsewhere, and the page cannot be framed.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
                                 b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
_STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class _SecurityHeaders:
    """ASGI middleware adding ``SECURITY_HEADERS`` to every HTTP response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in SECURITY_HEADERS if k not in names]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def format_ns(stamp_ns: int) -> str:
    """A stamp as UTC date and time to the millisecond."""
    t = datetime.fromtimestamp(stamp_ns // 1_000_000_000, tz=timezone.utc)
    return f"{t:%Y-%m-%d %H:%M:%S}.{stamp_ns % 1_000_000_000 // 1_000_000:03d} UTC"


def parse_time(name: str, value: str | None) -> int | None:
    """A time-window bound: nanoseconds since the epoch, or an ISO 8601 date-time (UTC unless
    it names its zone). Empty: no bound."""
    value = (value or "").strip()
    if not value:
        return None
    if value.isdigit() and len(value) <= 19:
        ns = int(value)
    else:
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ViewError(f"{name}: expected nanoseconds or an ISO 8601 date-time "
                            f"such as 2026-12-05T14:30:00, got {value[:40]!r}") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        delta = t - datetime(1970, 1, 1, tzinfo=timezone.utc)
        ns = (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000
    if not 0 <= ns <= MAX_STAMP_NS:
        raise ViewError(f"{name}: expected a time between 1970 and 2262, got {value[:40]!r}")
    return ns


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    if not raw.isdigit() or len(raw) > 19 or not lo <= int(raw) <= hi:
        raise ViewError(f"{name}: expected an integer in [{lo}, {hi}], got {raw[:40]!r}")
    return int(raw)


def episode_json(e: Episode) -> dict:
    return {
        "id": e.id,
        "stamp_ns": e.stamp_ns,
        "time": format_ns(e.stamp_ns),
        "caption": e.caption,
        "source": e.source,
        "robot": getattr(e, "robot", None),  # stores that record the robot have it
        "thumbnail": f"/thumbnail/{e.id}.jpg" if e.thumbnail_jpeg else None,
        "url": f"/episode/{e.id}",
    }


def hit_json(h) -> dict:
    return {
        **episode_json(h.episode),
        "score": h.score,
        "matched_by": h.matched_by,
        "lexical_score": h.lexical_score,
        "lexical_rank": h.lexical_rank,
        "embedding_score": None if math.isnan(h.embedding_score) else h.embedding_score,
        "embedding_rank": h.embedding_rank,
    }


def create_app(view: MemoryView, *, allowed_hosts: list[str] | None = None,
               default_page_size: int = DEFAULT_PAGE_SIZE) -> Starlette:
    """The browser over ``view``. ``allowed_hosts``: the Host headers served (default: loopback
    names only, so a web page elsewhere cannot reach it through DNS rebinding)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(PACKAGE_DIR / "templates")), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["when"] = format_ns
    templates = Jinja2Templates(env=env)
    static = {name: ((PACKAGE_DIR / "static" / name).read_bytes(), _STATIC_TYPES[Path(name).suffix])
              for name in ("app.js", "style.css")}
    token = secrets.token_urlsafe(32)  # POSTs that change the store carry it: other sites cannot read it

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        context.update(token=token, store_dir=str(view.store_dir), writable=view.allow_clear,
                       poll_ms=int(POLL_INTERVAL_S * 1000), max_k=MAX_QUERY_K, default_k=DEFAULT_K,
                       max_upload=MAX_UPLOAD_BYTES)
        return templates.TemplateResponse(request, name, context, status_code=status)

    def error_page(request: Request, status: int, message: str) -> HTMLResponse:
        return page(request, "error.html", status=status, title=f"Error {status}", message=message)

    # ------------------------------------------------------------------ pages
    def timeline(request: Request) -> Response:
        try:
            tl = view.timeline(_int_param(request, "page", 1, 1, 10**9),
                               _int_param(request, "per_page", default_page_size, 1, MAX_PAGE_SIZE))
        except ViewError as exc:
            return error_page(request, 400, str(exc))
        except StoreError as exc:
            return error_page(request, 503, str(exc))
        return page(request, "timeline.html", title="Timeline", tl=tl)

    def episode(request: Request) -> Response:
        try:
            detail = view.episode(request.path_params["id"])
        except ViewError as exc:
            return error_page(request, 400, str(exc))
        except KeyError:
            return error_page(request, 404, f"no episode {request.path_params['id']} in this store")
        except StoreError as exc:
            return error_page(request, 503, str(exc))
        return page(request, "episode.html", title=f"Episode {detail.episode.id}", d=detail)

    def thumbnail(request: Request) -> Response:
        try:
            jpeg = view.thumbnail(request.path_params["id"])
        except (ViewError, KeyError):
            jpeg = b""
        if not jpeg:
            return Response(status_code=404)
        return Response(jpeg, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    def static_file(request: Request) -> Response:
        found = static.get(request.path_params["name"])  # a dict lookup: never a path
        if found is None:
            return Response(status_code=404)
        return Response(found[0], media_type=found[1])

    def picture(render):
        def endpoint(request: Request) -> Response:
            png = render(view.memory_picture())
            if png is None:
                return Response(status_code=404)
            return Response(png, media_type="image/png")
        return endpoint

    # ------------------------------------------------------------------ API
    def api_episodes(request: Request) -> Response:
        tl = view.timeline(_int_param(request, "page", 1, 1, 10**9),
                           _int_param(request, "per_page", default_page_size, 1, MAX_PAGE_SIZE))
        return JSONResponse({"page": tl.page, "per_page": tl.per_page, "pages": tl.pages, "total": tl.total,
                             "episodes": [episode_json(e) for e in tl.episodes]})

    def api_episode(request: Request) -> Response:
        d = view.episode(request.path_params["id"])
        return JSONResponse({**episode_json(d.episode),
                             "older": [episode_json(e) for e in d.older],
                             "newer": [episode_json(e) for e in d.newer],
                             "similar": [{**episode_json(e), "embedding_score": s} for e, s in d.similar]})

    async def api_search(request: Request) -> Response:
        image = None
        if request.method == "POST":
            image = await _read_bounded(request, MAX_UPLOAD_BYTES)
        q = request.query_params.get("q")
        k = _int_param(request, "k", DEFAULT_K, 1, MAX_QUERY_K)
        start = parse_time("start", request.query_params.get("start"))
        end = parse_time("end", request.query_params.get("end"))
        result = await run_in_threadpool(view.search, q, image or None, k=k, start_ns=start, end_ns=end)
        return JSONResponse({"message": result.message, "total": result.total,
                             "hits": [hit_json(h) for h in result.hits]})

    def api_stats(request: Request) -> Response:
        s = view.stats()
        for end in ("newest", "oldest"):
            stamp = s[f"{end}_stamp_ns"]
            s[f"{end}_time"] = format_ns(stamp) if stamp is not None else None
        return JSONResponse(s)

    async def api_clear(request: Request) -> Response:
        if not view.allow_clear:
            return JSONResponse({"error": "read-only: start the browser with --allow-clear to clear the memory"},
                                status_code=403)
        if not secrets.compare_digest(request.headers.get("x-bitmar-token", ""), token):
            return JSONResponse({"error": "missing or wrong X-Bitmar-Token (reload the page)"}, status_code=403)
        body = await _read_bounded(request, 1024)
        try:
            confirmed = json.loads(body or b"{}").get("confirm") is True
        except (ValueError, AttributeError):
            confirmed = False
        if not confirmed:
            return JSONResponse({"error": 'clear: expected the JSON body {"confirm": true}'}, status_code=400)
        forgotten = await run_in_threadpool(view.clear)
        return JSONResponse({"forgotten": forgotten})

    def api(endpoint):
        """JSON errors for the API: 400 names the input, 404 the missing episode, 503 the store."""
        is_async = inspect.iscoroutinefunction(endpoint)

        async def wrapped(request: Request) -> Response:
            try:
                return await (endpoint(request) if is_async else run_in_threadpool(endpoint, request))
            except ViewError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except _TooLarge as exc:
                return JSONResponse({"error": str(exc)}, status_code=413)
            except KeyError as exc:
                return JSONResponse({"error": str(exc).strip("'\"")}, status_code=404)
            except (StoreError, PermissionError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=503)
        return wrapped

    routes = [
        Route("/", timeline),
        Route("/episode/{id:int}", episode),
        Route("/thumbnail/{id:int}.jpg", thumbnail),
        Route("/static/{name}", static_file),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/memory.png", picture(memory_png)),
        Route("/usage.png", picture(usage_png)),
        Route("/api/episodes", api(api_episodes)),
        Route("/api/episodes/{id:int}", api(api_episode)),
        Route("/api/search", api(api_search), methods=["GET", "POST"]),
        Route("/api/stats", api(api_stats)),
        Route("/api/clear", api(api_clear), methods=["POST"]),
    ]
    hosts = allowed_hosts if allowed_hosts is not None else LOOPBACK_HOSTS
    return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts),
                                                Middleware(_SecurityHeaders)])


class _TooLarge(ValueError):
    pass


async def _read_bounded(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes, whatever its Content-Length claims."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge(f"request body: expected at most {limit} bytes, got {declared}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"request body: expected at most {limit} bytes, got more")
        chunks.append(chunk)
    return b"".join(chunks)

