"""The FastAPI app: OpenAI-compatible routes, `/v1/score`, auth, limits and OpenAI-style errors.

`create_api(settings, backend)` builds the app around a backend that generates and scores (in Serve:
the deployment, whose `@serve.batch` methods group concurrent requests; see `deployment.py`). The app
knows nothing of Serve: it runs the same under Serve's proxy and under a test client.

Before routing, `Gate` (ASGI middleware) checks each request in this order, without reading its body:
the Host header (a keyless local server answers only loopback names: DNS rebinding), the API key
(every /v1 route), then the replica's admission bound for work routes (completions, chat, score): at
most `ongoing_requests()` at work and `queued_requests()` more waiting, FIFO, for a place; any more
are refused at once. Every request's deadline starts when it reaches the replica, so time spent
waiting (for a place, for a batch, for room in the running batch) counts toward the timeout; the
engine drops a request past its deadline before it prefills it.

Prompts are tokenized on a thread of their own (never on the event loop); generation runs on the
engine's decode thread and scoring on the backend's scoring thread.

Status codes (every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`):

  400  invalid request: bad JSON, a field out of range (empty prompt, max_tokens, temperature, n, ...),
       an unknown or unsupported parameter, prompt + max_tokens longer than the model's context,
       prompt tokens x n + max_tokens x n over the server's per-request token budget
  401  missing or wrong API key (`Authorization: Bearer <key>`), when the server has one
  403  a Host header this keyless local server does not answer to
  404  unknown model name, unknown route, /v1/score on a server without a reward model
  405  wrong HTTP method
  408  the request was not answered within the server's request timeout (time spent queued included)
  413  request body larger than the server's limit
  429  the replica is full (its requests at work and its queue); `Retry-After` says when to retry
  500  an internal error: a generic message with the request id; the detail is in the replica's log
       under that id (the replica keeps serving)
  503  /health, and work routes, once the replica's decode thread has died (Serve replaces the replica)
"""


import asyncio
import difflib
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar, cast

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylign.serving.batching import ScoreJob
from raylign.serving.engine import Engine, EngineDead, Job, RowUpdate, Sampling, TokenLogprob
from raylign.serving.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    LOGPROB_FLOOR,
    UNSUPPORTED,
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionFields,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionFields,
    CompletionLogprobs,
    CompletionResponse,
    Delta,
    ErrorResponse,
    FinishReason,
    Health,
    ModelCard,
    ModelList,
    Score,
    ScoreFields,
    ScoreResponse,
    TopLogprob,
    Usage,
    event_stream_schema,
    request_models,
    score_request_model,
)
from raylign.serving.settings import RETRY_AFTER_S, ServeSettings, host_allowed

log = logging.getLogger("ray.serve")
T = TypeVar("T")

# Routes that take a place in the replica's admission bound (the rest are cheap: models, health, docs).
WORK_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/score"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class Backend(Protocol):
    """What the routes need: the engine (tokenizer, context, health), batched generation and scoring."""

    engine: Engine
    reward_name: str | None

    def generate(self, job: Job) -> AsyncIterator[list[RowUpdate]]: ...

    async def score(self, job: ScoreJob) -> list[float] | None:
        """The job's scores, or None if it was dropped (cancelled or past its deadline)."""
        ...


_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "invalid request", 401: "missing or wrong API key", 403: "Host not allowed", 404: "unknown model or route",
    408: "request timeout", 413: "request body too large", 429: "the replica is full; retry after Retry-After",
    500: "internal error", 503: "the replica is being replaced"}.items()}


def _streaming(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {**_ERRORS, 200: {"content": {"text/event-stream": {"schema": event_stream_schema(chunk)}},
                             "description": "JSON, or server-sent events when `stream` is true"}}


def create_api(settings: ServeSettings, backend: Backend) -> FastAPI:
    """The HTTP app of one served model (see the module docstring for routes and status codes)."""
    if TYPE_CHECKING:  # classes made for this server's limits, typed as the classes they extend
        CompletionRequest: TypeAlias = CompletionFields
        ChatCompletionRequest: TypeAlias = ChatCompletionFields
        ScoreRequest: TypeAlias = ScoreFields
    else:  # FastAPI reads the route's annotation at run time: it must be the class with the limits
        CompletionRequest, ChatCompletionRequest = request_models(settings, backend.engine.vocab_size)
        ScoreRequest = score_request_model(settings)
    api_key = settings.resolved_api_key()
    engine = backend.engine
    created = int(time.time())
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="raylign-tokenize")

    app = FastAPI(title="raylign", version="1", description=f"OpenAI-compatible endpoint serving {settings.name}")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Gate, api_key=api_key, allowed_hosts=settings.allowed_hosts,
                       admission=Admission(settings.ongoing_requests(), settings.queued_requests()),
                       timeout_s=settings.request_timeout_s)
    _add_error_handlers(app, sorted({*CompletionRequest.model_fields, *ChatCompletionRequest.model_fields,
                                     *ScoreRequest.model_fields}))

    # `Gate` checks the key before the body is read; this declares the scheme in the OpenAPI schema.
    bearer = HTTPBearer(auto_error=False, description="the server's API key")
    guarded = [Depends(bearer)] if api_key else []

    async def off_loop(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    def check_model(name: str | None, served: str | None = settings.name, param: str = "model") -> None:
        if name is not None and name != served:
            known = ", ".join(repr(n) for n in (settings.name, backend.reward_name) if n)
            raise ApiError(404, f"model {name!r} is not served here; models: {known} (GET /v1/models)",
                           param=param, code="model_not_found")

    strings = TokenStrings(engine)

    def sampling(body: Any, max_tokens: int, logprobs: int | None = None, echo: bool = False) -> Sampling:
        stop_ids = tuple(body.stop_token_ids or ())
        check_ids(list(stop_ids), "stop_token_ids")
        return Sampling(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p, stop=body.stops(), seed=body.seed,
                        logprobs=logprobs, echo=echo, stop_token_ids=stop_ids)

    def check_ids(ids: list[int], param: str) -> None:
        if ids and max(ids) >= engine.vocab_size:
            raise ApiError(400, f"token id {max(ids)} is out of range: this model's vocabulary has "
                           f"{engine.vocab_size} tokens (ids 0..{engine.vocab_size - 1})", param=param)

    def prompt_ids(prompt: Any) -> tuple[list[list[int]], list[str | None]]:
        """A completions prompt as token ids per prompt, and each given text (None for ids)."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        ids = [engine.encode_text(p) if isinstance(p, str) else list(p) for p in prompt]
        for p in prompt:
            if not isinstance(p, str):
                check_ids(p, "prompt")
        return ids, [p if isinstance(p, str) else None for p in prompt]

    def check_context(ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        if len(ids) + max_tokens > engine.context_length:
            raise ApiError(400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}; the model's "
                           f"context is {engine.context_length} tokens. Shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")

    def check_budget(ids: list[list[int]], max_tokens: int, n: int) -> None:
        tokens = n * sum(len(p) + max_tokens for p in ids)
        if tokens > settings.max_request_tokens:
            raise ApiError(400, f"this request asks for {tokens} tokens (prompt tokens x n + max_tokens x n); the "
                           f"server's limit per request is {settings.max_request_tokens}. Lower n or max_tokens, "
                           "or send fewer or shorter prompts", param="max_tokens", code="token_budget_exceeded")

    async def answer(request: Request, job: Job, reply: "Reply", stream: bool, include_usage: bool) -> Any:
        deadline = request_deadline(request)
        if stream:
            return _event_stream(reply.chunks(backend.generate(job), job, deadline, include_usage))
        await reply.collect(backend.generate(job), job, deadline)
        return None

    @app.get("/health", response_model=Health, responses={503: _ERRORS[503]}, tags=["server"])
    async def health() -> Health:
        try:
            engine.check_alive()
        except EngineDead as exc:
            raise _replica_dead() from exc
        return Health(model=settings.name)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, dependencies=guarded, tags=["openai"])
    async def models() -> ModelList:
        cards = [ModelCard(id=settings.name, created=created)]
        if backend.reward_name:
            cards.append(ModelCard(id=backend.reward_name, created=created, purpose="score"))
        return ModelList(data=cards)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_streaming(CompletionChunk),
              dependencies=guarded, tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        check_model(body.model)
        max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
        echo = bool(body.echo)
        ids, given = await off_loop(prompt_ids, body.prompt)
        for one in ids:
            check_context(one, max_tokens)
        check_budget(ids, max_tokens, body.n)
        job = Job(ids, sampling(body, max_tokens, body.logprobs, echo), n=body.n, stream=bool(body.stream),
                  deadline=request_deadline(request))
        # an echoed prompt: the text as given, or the decoded token ids
        echoed = [(text if text is not None else engine.decode(one)) if echo else ""
                  for one, text in zip(ids, given, strict=True)]
        reply = Reply("cmpl", settings.name, chat=False, rows=job.rows, prompt_tokens=sum(map(len, ids)),
                      request_id=request_id(request), timeout_s=settings.request_timeout_s,
                      strings=strings if body.logprobs is not None else None,
                      echoed=[echoed[r // body.n] for r in range(job.rows)])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if (events := await answer(request, job, reply, bool(body.stream), include_usage)) is not None:
            return events
        logprobs = await off_loop(reply.completion_logprobs) if body.logprobs is not None else [None] * job.rows
        return CompletionResponse(
            id=reply.id, created=reply.created, model=settings.name, usage=reply.usage(),
            choices=[CompletionChoice(index=i, text=reply.echoed[i] + t, finish_reason=f, logprobs=logprobs[i])
                     for i, (t, f) in enumerate(reply.choices())])

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_streaming(ChatCompletionChunk),
              dependencies=guarded, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = await off_loop(engine.encode_chat, messages)
        except Exception as exc:  # noqa: BLE001 - the model's own Jinja template refused the conversation
            raise ApiError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(settings.default_max_tokens, engine.context_length - len(ids)))
        top = (body.top_logprobs or 0) if body.logprobs else None
        check_context(ids, max_tokens)
        check_budget([ids], max_tokens, body.n)
        job = Job([ids], sampling(body, max_tokens, top), n=body.n, stream=bool(body.stream),
                  deadline=request_deadline(request))
        reply = Reply("chatcmpl", settings.name, chat=True, rows=job.rows, prompt_tokens=len(ids),
                      request_id=request_id(request), timeout_s=settings.request_timeout_s,
                      strings=strings if top is not None else None)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if (events := await answer(request, job, reply, bool(body.stream), include_usage)) is not None:
            return events
        logprobs = await off_loop(reply.chat_logprobs) if top is not None else [None] * job.rows
        return ChatCompletionResponse(
            id=reply.id, created=reply.created, model=settings.name, usage=reply.usage(),
            choices=[ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f, logprobs=logprobs[i])
                     for i, (t, f) in enumerate(reply.choices())])

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, dependencies=guarded, tags=["raylign"])
    async def score(body: ScoreRequest, request: Request) -> ScoreResponse:
        """Score (prompt, completion) pairs with the reward model loaded beside the policy."""
        if not backend.reward_name:
            raise ApiError(404, "this server has no reward model; start it with --reward-model SPEC "
                           "(a reward model dir, a discriminator, lexicon:vader, ...)", code="model_not_found")
        check_model(body.model, backend.reward_name)
        prompts = [p.prompt if not isinstance(p.prompt, list) else
                   [{"role": m.role, "content": m.text()} for m in p.prompt] for p in body.pairs]
        deadline = request_deadline(request)
        job = ScoreJob(prompts, [p.completion for p in body.pairs], deadline=deadline)
        try:
            scores = await asyncio.wait_for(backend.score(job), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            scores = None
        finally:
            job.cancel()  # a no-op once scored; else the scoring thread skips what is left of it
        if scores is None:
            raise _timeout(settings.request_timeout_s)
        if not all(math.isfinite(s) for s in scores):
            raise RuntimeError(f"the reward source returned a non-finite score: {scores}")
        return ScoreResponse(model=backend.reward_name, data=[Score(index=i, score=s) for i, s in enumerate(scores)])

    _publish_chunk_schemas(app)
    return app


# ---- the gate: Host, API key, request id and deadline, admission -----------------------------------


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("raylign_request_id") or "-")


def request_deadline(request: Request) -> float:
    """When this request times out (`time.monotonic()`), set by `Gate` when it reached the replica."""
    return float(request.scope.get("state", {}).get("raylign_deadline") or math.inf)


class Refused(Exception):
    """A request the admission bound turns away (`error` is its answer)."""

    def __init__(self, error: ApiError, headers: dict[str, str] | None = None):
        super().__init__(error.message)
        self.error, self.headers = error, headers or {}


class Admission:
    """One replica's bound on work: `ongoing` requests at work and up to `queued` more waiting, first
    come first served, for a place; any more are refused with 429 at once, and one still waiting at its
    deadline with 408 (it never reaches the engine)."""

    def __init__(self, ongoing: int, queued: int):
        self.ongoing, self.queued = ongoing, queued
        self.waiting = 0
        self._places = asyncio.Semaphore(ongoing)

    @asynccontextmanager
    async def place(self, deadline: float, timeout_s: float) -> AsyncIterator[None]:
        if self._places.locked():
            if self.waiting >= self.queued:
                raise Refused(ApiError(
                    429, f"the server is busy: {self.ongoing} requests are at work on this replica and {self.waiting} "
                    f"are waiting; retry in {RETRY_AFTER_S}s", type="rate_limit_error", code="server_busy"),
                    {"Retry-After": str(RETRY_AFTER_S)})
            self.waiting += 1
            try:
                await asyncio.wait_for(self._places.acquire(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                raise Refused(_timeout(timeout_s)) from None
            finally:
                self.waiting -= 1
        else:
            await self._places.acquire()  # a free place: returns at once
        try:
            yield
        finally:
            self._places.release()


class Gate:
    """ASGI middleware, outside routing: Host check, API key, request id and deadline, admission (see
    the module docstring). Refusals never read the request's body."""

    def __init__(self, app: Any, api_key: str | None, allowed_hosts: list[str] | None, admission: Admission,
                 timeout_s: float):
        self.app, self.api_key, self.allowed_hosts = app, api_key, allowed_hosts
        self.admission, self.timeout_s = admission, timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        state = scope.setdefault("state", {})
        arrival = time.monotonic()
        state["raylign_deadline"] = deadline = arrival + self.timeout_s
        given = headers.get("x-request-id", "")
        rid = given if _REQUEST_ID.fullmatch(given) else f"req-{uuid.uuid4().hex}"
        state["raylign_request_id"] = rid
        # behind Serve's proxy the id is its own, which it returns itself
        state["raylign_echo_id"] = echo = rid != given
        send = _with_headers(send, arrival, rid if echo else None)
        path = scope.get("path", "")
        if self.allowed_hosts is not None and not host_allowed(headers.get("host"), self.allowed_hosts):
            return await _send_error(send, ApiError(
                403, "this server has no API key and answers only requests to a loopback name (localhost, "
                "127.0.0.1, [::1]); start it with an API key to serve other names", code="host_not_allowed"))
        if self.api_key is not None and path.startswith("/v1/") and not self._authorized(headers):
            return await _send_error(send, ApiError(
                401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                type="authentication_error", code="invalid_api_key"))
        if path not in WORK_ROUTES or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        try:
            async with self.admission.place(deadline, self.timeout_s):
                return await self.app(scope, receive, send)
        except Refused as refused:
            return await _send_error(send, refused.error, refused.headers)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        return (self.api_key is not None and scheme.lower() == "bearer"
                and hmac.compare_digest(credentials.strip().encode(), self.api_key.encode()))


def _with_headers(send: Any, arrival: float, request_id: str | None) -> Any:
    """`send` adding `Server-Timing: replica;dur=<ms>` (how long the replica held the request before it
    answered, time queued included: what the timeout bounds) and the request id, when it is our own."""
    async def sending(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers.append("server-timing", f"replica;dur={(time.monotonic() - arrival) * 1000:.1f}")
            if request_id is not None:
                headers.append("x-request-id", request_id)
        await send(message)

    return sending


def _publish_chunk_schemas(app: FastAPI) -> None:
    """Put the stream chunk models into the OpenAPI components that the event-stream schemas refer to."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "serialization") for m in (CompletionChunk, ChatCompletionChunk)],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema


# ---- replies ---------------------------------------------------------------------------------------


def _timeout(seconds: float) -> ApiError:
    return ApiError(408, f"the request was not answered within the server's timeout of {seconds:g}s (time "
                    "spent queued included); lower max_tokens or n, or retry when the server is less busy",
                    type="timeout", code="timeout")


def _internal(rid: str) -> ApiError:
    """The body of every 500: a generic message and the request id, under which the replica logged the detail."""
    return ApiError(500, f"internal error (request id {rid}); the server's log has the details under that id",
                    type="server_error", code="internal_error")


def _replica_dead() -> ApiError:
    return ApiError(503, "this replica can no longer generate and is being replaced; retry shortly",
                    type="server_error", code="replica_unavailable")


class TokenStrings:
    """Token ids as OpenAI's log-prob fields show them: each token's text and UTF-8 bytes, and where
    each token starts in the text of a sequence."""

    def __init__(self, engine: Engine):
        self.engine = engine
        tokenizer = engine.tokenizer
        self._texts: dict[int, str] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        # Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen2): a token is bytes spelled in printable
        # characters (Radford et al. 2019), so its exact bytes are known even for part of a character.
        self._byte_of = {c: b for b, c in _bytes_to_unicode().items()} if "ByteLevel" in repr(decoder) else None

    def text(self, token: int) -> str:
        if token not in self._texts:
            self._texts[token] = cast(str, self.engine.tokenizer.decode(
                [token], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        return self._texts[token]

    def bytes(self, token: int) -> list[int]:
        piece = self.engine.tokenizer.convert_ids_to_tokens(token)
        if self._byte_of is not None and isinstance(piece, str) and all(c in self._byte_of for c in piece):
            return [self._byte_of[c] for c in piece]
        return list(self.text(token).encode("utf-8"))

    def offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """len(decode(ids[:i])) for i in start..len(ids)-1: where token i's text starts."""
        return [len(self.engine.decode(ids[:i])) for i in range(start, len(ids))]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map of byte-level BPE (openai/gpt-2, encoder.py)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


class Reply:
    """Collects one request's row updates (and log-probs, when `strings` is given) into OpenAI
    responses or stream chunks."""

    def __init__(self, prefix: str, model: str, chat: bool, rows: int, prompt_tokens: int,
                 request_id: str = "-", timeout_s: float = math.inf, strings: TokenStrings | None = None,
                 echoed: list[str] | None = None):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.request_id, self.timeout_s = request_id, timeout_s
        self.texts = [""] * rows
        self.tokens = [0] * rows
        self.finish: list[str | None] = [None] * rows
        self.strings = strings
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]
        self.prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]
        self.echoed = echoed or [""] * rows  # each choice's echoed prompt ("" without echo)
        self._started = [False] * rows  # a streamed choice's first chunk (which carries its echo) is out

    @property
    def open_rows(self) -> int:
        return sum(f is None for f in self.finish)

    def apply(self, update: RowUpdate) -> None:
        self.texts[update.row] += update.text
        self.tokens[update.row] = update.completion_tokens
        self.logprobs[update.row].extend(update.logprobs)
        if update.prompt_logprobs is not None:
            self.prompt_logprobs[update.row] = list(update.prompt_logprobs)
        if update.finish_reason is not None:
            self.finish[update.row] = update.finish_reason

    def _strings(self) -> TokenStrings:
        if self.strings is None:
            raise RuntimeError("this reply was made without log-probs")
        return self.strings

    def completion_logprobs(self) -> list[CompletionLogprobs]:
        """Each choice's log-probs (its echoed prompt's first), `text_offset` into its text, which
        starts with the echoed prompt, if any."""
        out = []
        for row, prompt in enumerate(self.echoed):
            prompt_entries, entries = self.prompt_logprobs[row], self.logprobs[row]
            offsets = self._strings().offsets([t for t, _, _ in prompt_entries])
            offsets += [len(prompt) + o for o in self._strings().offsets([t for t, _, _ in entries])]
            out.append(self._completion_entries([*prompt_entries, *entries], offsets))
        return out

    def _completion_entries(self, entries: list[TokenLogprob], offsets: list[int]) -> CompletionLogprobs:
        text = self._strings().text
        return CompletionLogprobs(
            tokens=[text(t) for t, _, _ in entries],
            token_logprobs=[None if lp is None else _finite(lp) for _, lp, _ in entries],
            top_logprobs=[None if lp is None else {text(a): _finite(v) for a, v in top} for _, lp, top in entries],
            text_offset=offsets)

    def chat_logprobs(self) -> list[ChatLogprobs]:
        return [self._chat_entries(entries) for entries in self.logprobs]

    def _chat_entries(self, entries: list[TokenLogprob]) -> ChatLogprobs:
        strings = self._strings()
        return ChatLogprobs(content=[ChatTokenLogprob(
            token=strings.text(t), logprob=_finite(lp if lp is not None else LOGPROB_FLOOR), bytes=strings.bytes(t),
            top_logprobs=[TopLogprob(token=strings.text(a), logprob=_finite(v), bytes=strings.bytes(a)) for a, v in top])
            for t, lp, top in entries])

    def _chunk_logprobs(self, update: RowUpdate, first: bool) -> ChatLogprobs | CompletionLogprobs | None:
        """The log-probs of the tokens one streamed update adds, the echoed prompt's with the choice's
        `first` chunk (offsets into the whole choice's text)."""
        if self.strings is None:
            return None
        if self.chat:
            return self._chat_entries(update.logprobs)
        row = update.row
        prompt = self.prompt_logprobs[row] if first else []
        ids = [t for t, _, _ in self.logprobs[row]]
        offsets = self.strings.offsets([t for t, _, _ in prompt])
        offsets += [len(self.echoed[row]) + o for o in self.strings.offsets(ids, len(ids) - len(update.logprobs))]
        return self._completion_entries([*prompt, *update.logprobs], offsets)

    def usage(self) -> Usage:
        completion = sum(self.tokens)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)

    def choices(self) -> list[tuple[str, FinishReason]]:
        return [(text, _reply_reason(finish)) for text, finish in zip(self.texts, self.finish, strict=True)]

    async def updates(self, stream: AsyncIterator[list[RowUpdate]], job: Job, deadline: float
                      ) -> AsyncIterator[RowUpdate]:
        """The job's updates until all its rows finished; cancels the job at its deadline (`time.monotonic()`)
        or on disconnect. A row the engine dropped (the deadline passed there first) is a timeout too."""
        try:
            while self.open_rows:
                try:
                    batch = await asyncio.wait_for(anext(stream), max(deadline - time.monotonic(), 0.0))
                except StopAsyncIteration:
                    raise RuntimeError("generation ended before every choice finished") from None
                except asyncio.TimeoutError:
                    raise _timeout(self.timeout_s) from None
                for update in batch:
                    if update.finish_reason == "cancelled":
                        raise _timeout(self.timeout_s)
                    self.apply(update)
                    yield update
        finally:
            job.cancel()  # no-op once every row finished; else frees the rows in the running batch
            await _close(stream)

    async def collect(self, stream: AsyncIterator[list[RowUpdate]], job: Job, deadline: float) -> None:
        async for _ in self.updates(stream, job, deadline):
            pass

    async def chunks(self, stream: AsyncIterator[list[RowUpdate]], job: Job, deadline: float,
                     include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        if self.chat:
            for row in range(len(self.texts)):
                yield self._event(row, "", None, role=True)
        try:
            async for update in self.updates(stream, job, deadline):
                first, self._started[update.row] = not self._started[update.row], True
                text = (self.echoed[update.row] if first else "") + update.text
                if text or update.logprobs or (first and self.prompt_logprobs[update.row]):
                    yield self._event(update.row, text, None, logprobs=self._chunk_logprobs(update, first))
                if update.finish_reason is not None:
                    yield self._event(update.row, "", _reply_reason(update.finish_reason))
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        except Exception:  # noqa: BLE001 - the stream has started: report in-band, keep serving
            log.exception("raylign: request %s failed while streaming", self.request_id)
            yield f"data: {json.dumps(_internal(self.request_id).body())}\n\n"
            return
        if include_usage:
            yield self._usage_event()
        yield "data: [DONE]\n\n"

    def _data(self, chunk: ChatCompletionChunk | CompletionChunk) -> str:
        return f"data: {json.dumps(chunk.model_dump(exclude={'usage'} if chunk.usage is None else None))}\n\n"

    def _usage_event(self) -> str:
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        return self._data(kind(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage()))

    def _event(self, row: int, text: str, finish: FinishReason | None, role: bool = False,
               logprobs: ChatLogprobs | CompletionLogprobs | None = None) -> str:
        if self.chat:
            delta = Delta(role="assistant", content="") if role else Delta(content=text or None)
            return self._data(ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model,
                choices=[ChatChunkChoice(index=row, delta=delta, finish_reason=finish,
                                         logprobs=cast(ChatLogprobs | None, logprobs))]))
        return self._data(CompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionChunkChoice(index=row, text=text, finish_reason=finish,
                                           logprobs=cast(CompletionLogprobs | None, logprobs))]))


def _reply_reason(reason: str | None) -> FinishReason:
    """A finished row's reason, as a reply states it (a cancelled job's rows never reach a reply)."""
    if reason == "stop":
        return "stop"
    if reason == "length":
        return "length"
    raise RuntimeError(f"a row that ended with {reason!r} cannot be part of a reply")


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - closing a finished or failed generator
            pass


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- errors ------------------------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI, known_params: list[str]) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(EngineDead)
    async def engine_dead(request: Request, exc: EngineDead) -> JSONResponse:
        log.error("raylign: request %s refused: %s", request_id(request), exc)
        return JSONResponse(_replica_dead().body(), status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error(exc.errors(), known_params).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}; routes: /v1/completions, /v1/chat/completions, "
                        "/v1/models, /v1/score, /health (docs: /docs)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(ApiError(exc.status_code, message, code=None).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.error("raylign: request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=exc)
        # Sent from outside `Gate` (Starlette answers uncaught errors last), so the id header is added here.
        echo = request.scope.get("state", {}).get("raylign_echo_id")
        return JSONResponse(_internal(rid).body(), status_code=500, headers={"x-request-id": rid} if echo else None)


def validation_error(errors: Sequence[dict[str, Any]], known_params: Sequence[str] = ()) -> ApiError:
    """pydantic/FastAPI validation errors -> one 400 naming the first bad field."""
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    if first.get("type") == "missing" and not loc:
        return ApiError(400, "the request needs a JSON body", code="invalid_json")
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if loc and loc[0] in UNSUPPORTED:
        message = f"'{loc[0]}' is not supported by this server; leave it out"
    elif len(loc) > 1 and loc[0] == "prompt":  # one error per form a prompt may take: name the forms
        param = "prompt"
        message = ("prompt: give a non-empty text, a list of them, a non-empty list of token ids (integers >= 0), "
                   "or a list of those lists (at most as many prompts as the server's limit)")
    elif first.get("type") == "extra_forbidden" and loc:
        close = difflib.get_close_matches(loc[-1], known_params, n=1)
        message = f"unknown parameter '{param}'" + (f". Did you mean '{close[0]}'?" if close else "")
    elif param:
        message = f"{param}: {message}"
    more = len(errors) - 1
    return ApiError(400, message + (f" (and {more} more problem{'s' * (more > 1)})" if more else ""), param=param)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before anything parses it."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                return await _send_error(send, ApiError(400, "invalid Content-Length header"))
            if too_big:
                return await _send_error(send, self._error())
            return await self.app(scope, receive, send)
        messages, size = [], 0  # no length given (chunked): read up to the limit, then replay
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _send_error(send, self._error())
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    def _error(self) -> ApiError:
        return ApiError(413, f"the request body is larger than this server's limit of {self.limit} bytes",
                        code="request_too_large")


async def _send_error(send: Any, error: ApiError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})
