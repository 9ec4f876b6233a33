"""The annotation web app: pages for people, a JSON API for programs, one judgments table for both.

Every address needs the annotator's token except `/health` and the link itself (`/a/TOKEN`, which
checks it). A program sends `Authorization: Bearer TOKEN`; a browser opens the link
`http://HOST:PORT/a/TOKEN` once, which sets the token as an HttpOnly, SameSite=Lax cookie and
redirects to `/`. An unknown or missing token is answered 401 before any body is read. An annotator
sees only their own queue, progress and judgments. Forms carry a CSRF token (an HMAC of the
annotator under the database's secret); a JSON post authenticated by the cookie instead of the
bearer header must send it as `X-CSRF-Token`.

Pages (not in the OpenAPI schema): `GET /` the next item (or "all done"), `POST /judge` the form
(then 303 back to `/`, so a reload never re-sends it), `GET /item/{item_id}` one item again to change
an answer. Pair items show the prompt's turns and the two answers side by side, left/right as
`Store.shown_left` says (A = left, B = right on the page); rating items one answer with a 1-7 row
per criterion. Keyboard shortcuts (1 / 2 / 3 / 0) and the progress refresh come from the small
script in `static/`; without JavaScript the buttons submit the same form.

JSON API (in `/openapi.json`):

  GET  /api/next        200 the next item (claimed for you), 204 when your queue is empty
  POST /api/judgments   {item_id, choice: a|b|tie|skip, strength?: 1-3, ratings?: {criterion: 1-7},
                         reason?, written_by?: a|b, latency_ms?, shown_left?: a|b, idempotency_key?}
                        -> 201 the row (written_by: human-vs-model items only, the answer the
                        annotator thinks a person wrote)
  GET  /api/judgments   your current judgments
  GET  /api/progress    {done, remaining, total}

Status codes: 400 malformed JSON, 401 unknown token, 403 missing CSRF token, 404 unknown item, 409 an
item that has its annotators already or an idempotency key reused for other content, 411/413 a body
without a length or over 64 KiB, 415 not JSON, 422 a judgment that does not fit the item (every
error body is `{"error": {"message", "code", "field"}}`).

Deployment. The server binds 127.0.0.1 by default. To reach annotators elsewhere, keep it there and
put a TLS-terminating proxy in front, e.g. Caddy (`annotate.example.org { reverse_proxy
127.0.0.1:8000 }`) or nginx (`proxy_pass http://127.0.0.1:8000; proxy_set_header Host $host;
proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-For $remote_addr;`), start
it with `--proxy-headers` (trusting X-Forwarded-* from `--forwarded-allow-ips`, default 127.0.0.1) so
the cookie is marked Secure, and give `add-annotator --url https://annotate.example.org`. Tokens are
in links: the server writes no access log, and the pages send no Referer.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable
from importlib import resources
from typing import Any, Literal
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers, MutableHeaders

from raylign.annotation.errors import AnnotationError
from raylign.annotation.pages import render
from raylign.annotation.store import (
    Annotator,
    Judgment,
    KeyReused,
    NotAssigned,
    NotFound,
    Progress,
    Store,
    StoredItem,
    iso_time,
)
from raylign.annotation.tasks import (
    LIKERT_MAX,
    LIKERT_MIN,
    PAIR_KINDS,
    STRENGTH_MAX,
    STRENGTH_MIN,
    TaskItem,
    prompt_turns,
)

COOKIE = "raylign_annotator"
COOKIE_DAYS = 30
MAX_BODY = 64 * 1024
REASON_MAX = 2000
PUBLIC_PATHS = ("/health",)
STATIC = {"annotate.js": "text/javascript; charset=utf-8", "annotate.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
STRENGTHS = ((1, "slightly"), (2, "clearly"), (3, "much better"))


# ---- bodies ----------------------------------------------------------------------------------------


class JudgmentIn(BaseModel):
    """One judgment of one item. `choice` names the item's answers (a = response_a), not page sides."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(max_length=128, description="the item judged")
    choice: Literal["a", "b", "tie", "skip"] | None = Field(
        None, description="pair items: a | b | tie | skip (cannot judge); rating items: omit it, or skip")
    strength: int | None = Field(None, ge=STRENGTH_MIN, le=STRENGTH_MAX,
                                 description="with a or b: 1 slightly, 2 clearly, 3 much better")
    ratings: dict[str, int] | None = Field(None, description=f"rating items: {{criterion: {LIKERT_MIN}..{LIKERT_MAX}}} "
                                           "for every criterion of the item")
    reason: str | None = Field(None, max_length=REASON_MAX, description="free text, optional")
    written_by: Literal["a", "b"] | None = Field(
        None, description="human-vs-model items, optional: the answer you think a person wrote (the "
        "report's identification accuracy; 0.5 = people cannot tell the model from a person)")
    latency_ms: int | None = Field(None, ge=0, le=7 * 24 * 3600 * 1000,
                                   description="time spent on the item (default: since GET /api/next gave it)")
    shown_left: Literal["a", "b"] | None = Field(None, description="the answer you showed on the left (default: "
                                                  "the one /api/next said)")
    idempotency_key: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:\-]{8,128}$",
                                        description="send the same key when retrying: the judgment is stored once")


class Invalid(Exception):
    """A judgment that does not fit its item (422)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field


def check_judgment(item: TaskItem, choice: str | None, strength: int | None,
                   ratings: dict[str, int] | None, written_by: str | None = None) -> None:
    """What a judgment of this item must look like; raises `Invalid` naming the field."""
    if written_by is not None and item.kind != "human-vs-model":
        raise Invalid(f"written_by (which answer a person wrote) is asked of human-vs-model items; item "
                      f"{item.item_id!r} is a {item.kind} item", "written_by")
    if item.kind in PAIR_KINDS:
        if choice is None:
            raise Invalid(f"item {item.item_id!r} is a {item.kind} item: choice is required (a, b, tie or skip)", "choice")
        if ratings is not None:
            raise Invalid(f"item {item.item_id!r} is a {item.kind} item: it takes a choice, not ratings", "ratings")
        if strength is not None and choice not in ("a", "b"):
            raise Invalid(f"strength goes with choice a or b (how much better), not with {choice}", "strength")
        return
    criteria = item.criteria or []
    if choice not in (None, "skip"):
        raise Invalid(f"item {item.item_id!r} is a rating item: send ratings (choice only as skip)", "choice")
    if strength is not None:
        raise Invalid("strength is for pair items; a rating item takes ratings", "strength")
    if choice == "skip":
        if ratings:
            raise Invalid("a skipped item has no ratings", "ratings")
        return
    given = ratings or {}
    missing = [c for c in criteria if c not in given]
    unknown = [c for c in given if c not in criteria]
    if unknown:
        raise Invalid(f"unknown criteria {unknown}; item {item.item_id!r} is rated on {criteria}", "ratings")
    if missing:
        raise Invalid(f"ratings missing for {missing}; rate every criterion ({criteria}) or skip the item", "ratings")
    bad = {c: v for c, v in given.items() if not LIKERT_MIN <= v <= LIKERT_MAX}
    if bad:
        raise Invalid(f"ratings are {LIKERT_MIN}..{LIKERT_MAX}, got {bad}", "ratings")


class Turn(BaseModel):
    role: str
    content: str


class ProgressOut(BaseModel):
    done: int = Field(description="items you answered (a skip counts)")
    remaining: int = Field(description="items in your queue now")
    total: int = Field(description="done + remaining")


class ItemOut(BaseModel):
    item_id: str
    kind: Literal["pairwise", "human-vs-model", "rating"]
    prompt: str | list[Turn] | None
    response_a: str
    response_b: str | None
    shown_left: Literal["a", "b"] = Field(description="show this answer on the left (your order for this item; "
                                          "recorded with your judgment)")
    criteria: list[str] | None = Field(description="rating items: rate each 1-7")
    instructions: str
    progress: ProgressOut


class JudgmentOut(BaseModel):
    id: int
    item_id: str
    annotator: str
    choice: str | None
    strength: int | None
    ratings: dict[str, int] | None
    reason: str | None
    written_by: str | None = Field(description="human-vs-model items: the answer the annotator thinks a person wrote")
    shown_left: str | None
    latency_ms: int | None
    via: str
    time: str = Field(description="when it was recorded, ISO 8601 UTC")
    supersedes: int | None = Field(description="the judgment this one corrects")
    replayed: bool = Field(False, description="true when this post was a retry of an already stored judgment")


class ErrorBody(BaseModel):
    message: str
    code: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def judgment_out(j: Judgment, replayed: bool = False) -> JudgmentOut:
    return JudgmentOut(id=j.id, item_id=j.item_id, annotator=j.annotator, choice=j.choice, strength=j.strength,
                       ratings=j.ratings, reason=j.reason, written_by=j.written_by, shown_left=j.shown_left,
                       latency_ms=j.latency_ms,
                       via=j.via, time=iso_time(j.created), supersedes=j.supersedes, replayed=replayed)


def _error(status: int, message: str, code: str, field: str | None = None,
           headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"message": message, "code": code, "field": field, **extra}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "malformed JSON", 401: "unknown or missing token", 403: "missing CSRF token (cookie auth)",
    404: "unknown item", 409: "item not in your queue, or idempotency key reused", 413: "body too large",
    415: "not JSON", 422: "the judgment does not fit the item"}.items()}


# ---- the gate --------------------------------------------------------------------------------------


class TokenGate:
    """ASGI middleware: the annotator's token (bearer header or cookie) on every address but /health
    and the link, checked before the body is read; body size bounds; security headers on every answer."""

    def __init__(self, app: Any, store: Store):
        self.app, self.store = app, store

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_security_headers(send)
        path: str = scope.get("path", "")
        headers = Headers(scope=scope)
        if scope.get("method") == "POST":
            length = headers.get("content-length")
            if length is None and headers.get("transfer-encoding"):
                return await _asgi(send, _error(411, "send the body with a Content-Length", "length_required"))
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                return await _asgi(send, _error(413, f"the body is larger than {MAX_BODY} bytes", "body_too_large"))
        if path in PUBLIC_PATHS or path.startswith("/a/"):
            return await self.app(scope, receive, send)
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        via = "bearer" if scheme.lower() == "bearer" else "cookie"
        token = credentials.strip() if via == "bearer" else _cookie(headers.get("cookie", ""), COOKIE)
        annotator = self.store.annotator_by_token(token) if token else None
        if annotator is None:
            message = ("missing or unknown annotator token: send 'Authorization: Bearer <token>' or open your "
                       "annotator link (raylign annotate add-annotator prints it)")
            if path.startswith("/api/") or path == "/openapi.json" or via == "bearer":
                return await _asgi(send, _error(401, message, "invalid_token", headers={"WWW-Authenticate": "Bearer"}))
            return await _asgi(send, HTMLResponse(render("message.html", title="Sign-in needed", message=message),
                                                  status_code=401))
        state = scope.setdefault("state", {})
        state["annotator"], state["auth"] = annotator, via
        return await self.app(scope, receive, send)


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip().strip('"')
    return ""


async def _asgi(send: Any, response: Response) -> None:
    async def no_body() -> dict:
        return {"type": "http.disconnect"}

    await response({"type": "http"}, no_body, send)


def _with_security_headers(send: Any) -> Any:
    async def sending(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for key, value in SECURITY_HEADERS.items():
                if key not in headers:
                    headers[key] = value
        await send(message)

    return sending


# ---- the app ---------------------------------------------------------------------------------------


def create_app(store: Store) -> FastAPI:
    """The app over one annotations database (which must hold a task: `Store.load_task`)."""
    store.require_settings()
    app = FastAPI(title="raylign annotate", version="1", docs_url=None, redoc_url=None,
                  description="Human judgments of model answers: the annotator's queue, judgments and progress. "
                  "Authenticate with 'Authorization: Bearer <token>' (raylign annotate add-annotator).")
    app.add_middleware(TokenGate, store=store)
    bearer = HTTPBearer(auto_error=False, description="the annotator's token")
    guarded = [Depends(bearer)]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if "json" not in request.headers.get("content-type", ""):
            return _error(415, "send the body as JSON with 'Content-Type: application/json'", "unsupported_media_type")
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "the body is not valid JSON", "invalid_json")
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        field = ".".join(loc) or None
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "extra_forbidden":
            msg = f"unknown field; fields are: {', '.join(JudgmentIn.model_fields)}"
        text = f"{field}: {msg}" if field else msg
        details = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg")}
                   for e in errors]
        return _error(422, text, "invalid_request", field, errors=details)

    @app.exception_handler(AnnotationError)
    async def annotation_error(request: Request, exc: AnnotationError) -> Response:
        status, code = _status(exc)
        if request.url.path.startswith("/api/"):
            return _error(status, str(exc), code)
        annotator: Annotator | None = getattr(request.state, "annotator", None)
        return _page("message.html", status, annotator, store, title="Not available", message=str(exc))

    def who(request: Request) -> Annotator:
        annotator: Annotator = request.state.annotator
        return annotator

    # ---- JSON API ----

    @app.get("/api/next", response_model=ItemOut, dependencies=guarded, tags=["annotate"],
             responses={**_ERRORS, 204: {"description": "your queue is empty: nothing left to judge"}})
    def api_next(request: Request) -> Any:
        annotator = who(request)
        item, progress = store.next_item(annotator)
        if item is None:
            return Response(status_code=204)
        return item_out(store, annotator, item, progress)

    @app.post("/api/judgments", response_model=JudgmentOut, status_code=201, dependencies=guarded,
              tags=["annotate"], responses=_ERRORS)
    def api_judge(body: JudgmentIn, request: Request) -> Any:
        annotator = who(request)
        if request.state.auth == "cookie" and not store.check_csrf(annotator, request.headers.get("x-csrf-token")):
            return _error(403, "a post authenticated by the cookie needs the page's CSRF token in X-CSRF-Token "
                          "(programs: send 'Authorization: Bearer <token>' instead)", "csrf")
        item = store.item(body.item_id)
        try:
            check_judgment(item.item, body.choice, body.strength, body.ratings, body.written_by)
        except Invalid as exc:
            return _error(422, exc.message, "invalid_judgment", exc.field)
        row, replayed = store.record(annotator, body.item_id, choice=body.choice, strength=body.strength,
                                     ratings=body.ratings, reason=body.reason, latency_ms=body.latency_ms,
                                     shown_left=body.shown_left, idempotency_key=body.idempotency_key,
                                     written_by=body.written_by, via="api")
        return JSONResponse(judgment_out(row, replayed).model_dump(), status_code=201)

    @app.get("/api/judgments", response_model=list[JudgmentOut], dependencies=guarded, tags=["annotate"],
             responses=_ERRORS)
    def api_judgments(request: Request) -> list[JudgmentOut]:
        return [judgment_out(j) for j in store.current_judgments(who(request))]

    @app.get("/api/progress", response_model=ProgressOut, dependencies=guarded, tags=["annotate"], responses=_ERRORS)
    def api_progress(request: Request) -> ProgressOut:
        p = store.progress(who(request))
        return ProgressOut(done=p.done, remaining=p.remaining, total=p.total)

    @app.get("/health", tags=["server"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    # ---- pages ----

    @app.get("/a/{token}", include_in_schema=False)
    def link(token: str, request: Request) -> Response:
        annotator = store.annotator_by_token(token)
        if annotator is None:
            return _page("message.html", 401, None, store, title="Unknown link",
                         message="This annotator link is not valid (any more). Ask for a new one.")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, max_age=COOKIE_DAYS * 86400, httponly=True, samesite="lax",
                            secure=request.url.scheme == "https", path="/")
        return response

    @app.get("/", include_in_schema=False)
    def home(request: Request) -> Response:
        annotator = who(request)
        item, progress = store.next_item(annotator)
        if item is None:
            return _page("done.html", 200, annotator, store, title="All done", progress=progress,
                         previous=_previous(store, annotator))
        return item_page(store, annotator, item, progress=progress)

    @app.get("/item/{item_id}", include_in_schema=False)
    def item_again(item_id: str, request: Request) -> Response:
        annotator = who(request)
        return item_page(store, annotator, store.open_item(annotator, item_id))

    @app.post("/judge", include_in_schema=False)
    async def judge(request: Request) -> Response:
        annotator = who(request)
        if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return _page("message.html", 415, annotator, store, title="Unsupported form",
                         message="This form is sent as application/x-www-form-urlencoded.")
        form = {k: v[-1] for k, v in parse_qs((await request.body()).decode("utf-8", "replace"),
                                              keep_blank_values=True, max_num_fields=200).items()}
        if not store.check_csrf(annotator, form.get("csrf_token")):
            return _page("message.html", 403, annotator, store, title="Form expired",
                         message="This form's security token is missing or wrong. Reload the page and answer again.")
        return await _run(lambda: judge_form(store, annotator, form))

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            return _error(404, f"no static file {name!r}", "not_found")
        data = resources.files("raylign.annotation").joinpath("static", name).read_bytes()
        return Response(data, media_type=STATIC[name], headers={"cache-control": "no-cache"})

    return app


async def _run(fn: Callable[[], Response]) -> Response:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn)


def _status(exc: AnnotationError) -> tuple[int, str]:
    if isinstance(exc, NotFound):
        return 404, "item_not_found"
    if isinstance(exc, (NotAssigned, KeyReused)):
        return 409, "conflict"
    return 400, "invalid_request"


def item_out(store: Store, annotator: Annotator, stored: StoredItem, p: Progress) -> ItemOut:
    item = stored.item
    prompt: Any = item.prompt if isinstance(item.prompt, str) or item.prompt is None else \
        [Turn(role=t.role, content=t.content) for t in item.prompt]
    return ItemOut(item_id=item.item_id, kind=item.kind, prompt=prompt, response_a=item.response_a,
                   response_b=item.response_b, shown_left=store.shown_left(annotator, stored),
                   criteria=item.criteria, instructions=store.require_settings().instructions,
                   progress=ProgressOut(done=p.done, remaining=p.remaining, total=p.total))


def _previous(store: Store, annotator: Annotator, exclude: str | None = None) -> str | None:
    rows = [j for j in store.current_judgments(annotator) if j.item_id != exclude]
    return max(rows, key=lambda j: j.id).item_id if rows else None


def _page(template: str, status: int, annotator: Annotator | None, store: Store, **context: Any) -> HTMLResponse:
    if annotator is not None:
        context.setdefault("progress", store.progress(annotator))
        context["annotator"] = annotator.name
    return HTMLResponse(render(template, **context), status_code=status)


def describe_choice(choice: str | None, shown_left: str | None, ratings: dict[str, int] | None) -> str:
    """A stored judgment in the page's words (A = left, B = right)."""
    if choice == "skip":
        return "cannot judge"
    if choice == "tie":
        return "about the same"
    if choice in ("a", "b"):
        return f"{'A' if choice == (shown_left or 'a') else 'B'} is better"
    return "ratings " + ", ".join(f"{k} {v}" for k, v in (ratings or {}).items())


def item_page(store: Store, annotator: Annotator, stored: StoredItem, error: str | None = None,
              status: int = 200, form: dict[str, str] | None = None, progress: Progress | None = None) -> HTMLResponse:
    item = stored.item
    left_name = store.shown_left(annotator, stored)
    texts = {"a": item.response_a, "b": item.response_b}
    current = next((j for j in reversed(store.current_judgments(annotator)) if j.item_id == item.item_id), None)
    form = form or {}
    ratings = dict(current.ratings or {}) if current else {}
    if form:
        ratings = {c: int(form[f"rating-{i}"]) for i, c in enumerate(item.criteria or [])
                   if form.get(f"rating-{i}", "").isdigit()}
    strength = current.strength if current else None
    written_by = form.get("written_by") if form else (
        None if current is None or current.written_by is None else "left" if current.written_by == left_name else "right")
    extra = {"progress": progress} if progress is not None else {}
    return _page(
        "item.html", status, annotator, store, **extra, title=item.item_id, item_id=item.item_id,
        instructions=store.require_settings().instructions, error=error,
        current=describe_choice(current.choice, current.shown_left, current.ratings) if current else None,
        turns=prompt_turns(item.prompt), pair=item.kind in PAIR_KINDS, left=texts[left_name],
        right=texts["b" if left_name == "a" else "a"], csrf=store.csrf_token(annotator),
        nonce="page-" + secrets.token_urlsafe(16), strengths=STRENGTHS, strength=strength,
        ask_written_by=item.kind == "human-vs-model", written_by=written_by,
        criteria=item.criteria or [], scale=list(range(LIKERT_MIN, LIKERT_MAX + 1)), low=LIKERT_MIN,
        high=LIKERT_MAX, ratings=ratings, reason=form.get("reason", current.reason if current and current.reason else ""),
        reason_max=REASON_MAX, previous=_previous(store, annotator, exclude=item.item_id))


def judge_form(store: Store, annotator: Annotator, form: dict[str, str]) -> Response:
    """A submitted item form: store it and go back to `/` (303), or show the item again with the problem."""
    stored = store.item(form.get("item_id", ""))
    item = stored.item
    left = store.shown_left(annotator, stored)
    side = form.get("choice", "")
    choices = {"left": left, "right": "b" if left == "a" else "a", "tie": "tie", "skip": "skip", "rate": None}
    try:
        if side not in choices:
            raise Invalid("choose one of the buttons", "choice")
        choice = choices[side]
        strength_text = form.get("strength", "")
        strength = int(strength_text) if strength_text.isdigit() else None
        if strength is not None and choice not in ("a", "b"):
            strength = None  # a strength ticked before choosing "about the same" means nothing
        ratings: dict[str, int] | None = None
        if item.kind not in PAIR_KINDS and choice != "skip":
            ratings = {c: int(form[f"rating-{i}"]) for i, c in enumerate(item.criteria or [])
                       if form.get(f"rating-{i}", "").isdigit()}
        reason = form.get("reason", "").strip()[:REASON_MAX] or None
        written_by = {"left": left, "right": "b" if left == "a" else "a"}.get(form.get("written_by", ""))
        if choice == "skip":
            written_by = None  # "cannot judge" answers nothing, this question included
        check_judgment(item, choice, strength, ratings, written_by)
    except Invalid as exc:
        return item_page(store, annotator, stored, error=exc.message, status=422, form=form)
    key = form.get("idempotency_key") or None
    store.record(annotator, item.item_id, choice=choice, strength=strength, ratings=ratings, reason=reason,
                 idempotency_key=key if key and len(key) <= 128 else None, written_by=written_by, via="page")
    return RedirectResponse("/", status_code=303)


# ---- running it --------------------------------------------------------------------------------------


def check_port(host: str, port: int) -> None:
    """Fail with one message, before anything starts, when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise AnnotationError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or stop "
                                  "what uses it") from None


def serve(store: Store, host: str = "127.0.0.1", port: int = 8000, proxy_headers: bool = False,
          forwarded_allow_ips: str = "127.0.0.1", echo: Callable[[str], None] = print) -> None:
    """Run the app until Ctrl-C / SIGTERM (uvicorn; no access log, since links hold tokens)."""
    import uvicorn

    check_port(host, port)
    app = create_app(store)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning",
                            proxy_headers=proxy_headers, forwarded_allow_ips=forwarded_allow_ips,
                            server_header=False, timeout_graceful_shutdown=5)
    shown = f"[{host}]" if ":" in host else host
    echo(f"annotate: serving {len(store.items())} items to {len(store.annotators())} annotator(s) on "
         f"http://{shown}:{port}/  (Ctrl-C stops)")
    echo(f"annotate: add annotators with `raylign annotate add-annotator --db {store.path} NAME`; "
         "each gets their own link")
    if host not in ("127.0.0.1", "localhost", "::1") and not proxy_headers:
        echo("annotate: warning: this is plain HTTP on a non-loopback address; tokens travel in clear text. "
             "Put a TLS-terminating proxy in front (see `raylign annotate serve --help`)")
    started = time.time()
    try:
        uvicorn.Server(config).run()
    finally:
        echo(f"annotate: stopped after {time.time() - started:.0f}s; judgments are in {store.path}")
