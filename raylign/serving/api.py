"""The FastAPI app: OpenAI-compatible routes, `/v1/score`, auth, limits and OpenAI-style errors.

`create_api(settings, backend)` builds the app around a backend that generates and scores (in Serve:
the deployment, whose `@serve.batch` methods group concurrent requests; see `deployment.py`).

Status codes (every error body is OpenAI's `{"error": {"message", "type", "param", "code"}}`):

  400  invalid request: bad JSON, a field out of range (empty prompt, max_tokens, temperature, n, ...),
       an unknown or unsupported parameter, prompt + max_tokens longer than the model's context
  401  missing or wrong API key (`Authorization: Bearer <key>`), when the server has one
  404  unknown model name, unknown route, /v1/score on a server without a reward model
  405  wrong HTTP method
  408  the request ran longer than the server's request timeout
  413  request body larger than the server's limit
  500  an internal error (logged on the replica; the replica keeps serving)
"""


import asyncio
import difflib
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylign.serving.engine import Engine, Job, RowUpdate, Sampling
from raylign.serving.protocol import (
    DEFAULT_COMPLETION_TOKENS,
    UNSUPPORTED,
    ApiError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionFields,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionFields,
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
    Usage,
    event_stream_schema,
    request_models,
    score_request_model,
)
from raylign.serving.settings import ServeSettings

log = logging.getLogger("ray.serve")


class Backend(Protocol):
    """What the routes need: the engine (tokenizer, context), batched generation and scoring."""

    engine: Engine
    reward_name: str | None

    def generate(self, job: Job) -> AsyncIterator[list[RowUpdate]]: ...

    async def score(self, prompts: list[Any], completions: list[str]) -> list[float]: ...


_ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or route",
    408: "request timeout", 413: "request body too large", 500: "internal error"}.items()}


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
        CompletionRequest, ChatCompletionRequest = request_models(settings)
        ScoreRequest = score_request_model(settings)
    api_key = settings.resolved_api_key()
    engine = backend.engine
    created = int(time.time())

    app = FastAPI(title="raylign", version="1", description=f"OpenAI-compatible endpoint serving {settings.name}")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    _add_error_handlers(app, sorted({*CompletionRequest.model_fields, *ChatCompletionRequest.model_fields,
                                     *ScoreRequest.model_fields}))

    bearer = HTTPBearer(auto_error=False, description="the server's API key")

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if (credentials is None or api_key is None
                or not hmac.compare_digest(credentials.credentials.encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    guarded = [Depends(authorize)] if api_key else []

    def check_model(name: str | None, served: str | None = settings.name, param: str = "model") -> None:
        if name is not None and name != served:
            known = ", ".join(repr(n) for n in (settings.name, backend.reward_name) if n)
            raise ApiError(404, f"model {name!r} is not served here; models: {known} (GET /v1/models)",
                           param=param, code="model_not_found")

    def sampling(body: Any, max_tokens: int) -> Sampling:
        return Sampling(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p, stop=body.stops(), seed=body.seed)

    def check_context(ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        if len(ids) + max_tokens > engine.context_length:
            raise ApiError(400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}; the model's "
                           f"context is {engine.context_length} tokens. Shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        return Health(model=settings.name)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS, dependencies=guarded, tags=["openai"])
    async def models() -> ModelList:
        cards = [ModelCard(id=settings.name, created=created)]
        if backend.reward_name:
            cards.append(ModelCard(id=backend.reward_name, created=created, purpose="score"))
        return ModelList(data=cards)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_streaming(CompletionChunk),
              dependencies=guarded, tags=["openai"])
    async def completions(body: CompletionRequest) -> Any:
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
        ids = [engine.encode_text(p) for p in prompts]
        for prompt_ids in ids:
            check_context(prompt_ids, max_tokens)
        job = Job(ids, sampling(body, max_tokens), n=body.n, stream=bool(body.stream))
        reply = Reply("cmpl", settings.name, chat=False, rows=job.rows, prompt_tokens=sum(map(len, ids)))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _event_stream(reply.chunks(backend.generate(job), job, settings.request_timeout_s, include_usage))
        await reply.collect(backend.generate(job), job, settings.request_timeout_s)
        return CompletionResponse(
            id=reply.id, created=reply.created, model=settings.name, usage=reply.usage(),
            choices=[CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, f) in enumerate(reply.choices())])

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_streaming(ChatCompletionChunk),
              dependencies=guarded, tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = engine.encode_chat(messages)
        except Exception as exc:  # noqa: BLE001 - the model's own Jinja template refused the conversation
            raise ApiError(400, f"the model's chat template rejected these messages: {exc}", param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(settings.default_max_tokens, engine.context_length - len(ids)))
        check_context(ids, max_tokens)
        job = Job([ids], sampling(body, max_tokens), n=body.n, stream=bool(body.stream))
        reply = Reply("chatcmpl", settings.name, chat=True, rows=job.rows, prompt_tokens=len(ids))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _event_stream(reply.chunks(backend.generate(job), job, settings.request_timeout_s, include_usage))
        await reply.collect(backend.generate(job), job, settings.request_timeout_s)
        return ChatCompletionResponse(
            id=reply.id, created=reply.created, model=settings.name, usage=reply.usage(),
            choices=[ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f)
                     for i, (t, f) in enumerate(reply.choices())])

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, dependencies=guarded, tags=["raylign"])
    async def score(body: ScoreRequest) -> ScoreResponse:
        """Score (prompt, completion) pairs with the reward model loaded beside the policy."""
        if not backend.reward_name:
            raise ApiError(404, "this server has no reward model; start it with --reward-model SPEC "
                           "(a reward model dir, a discriminator, lexicon:vader, ...)", code="model_not_found")
        check_model(body.model, backend.reward_name)
        prompts = [p.prompt if not isinstance(p.prompt, list) else
                   [{"role": m.role, "content": m.text()} for m in p.prompt] for p in body.pairs]
        try:
            scores = await asyncio.wait_for(backend.score(prompts, [p.completion for p in body.pairs]),
                                            settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise _timeout(settings.request_timeout_s) from None
        if not all(math.isfinite(s) for s in scores):
            raise ApiError(500, f"the reward source returned a non-finite score: {scores}", type="server_error")
        return ScoreResponse(model=backend.reward_name, data=[Score(index=i, score=s) for i, s in enumerate(scores)])

    _publish_chunk_schemas(app)
    return app


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
    return ApiError(408, f"the request took longer than the server's timeout of {seconds:g}s; "
                    "lower max_tokens or n, or retry when the server is less busy", type="timeout", code="timeout")


class Reply:
    """Collects one request's row updates into OpenAI responses or stream chunks."""

    def __init__(self, prefix: str, model: str, chat: bool, rows: int, prompt_tokens: int):
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.texts = [""] * rows
        self.tokens = [0] * rows
        self.finish: list[str | None] = [None] * rows

    @property
    def open_rows(self) -> int:
        return sum(f is None for f in self.finish)

    def apply(self, update: RowUpdate) -> None:
        self.texts[update.row] += update.text
        self.tokens[update.row] = update.completion_tokens
        if update.finish_reason is not None:
            self.finish[update.row] = update.finish_reason

    def usage(self) -> Usage:
        completion = sum(self.tokens)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                     total_tokens=self.prompt_tokens + completion)

    def choices(self) -> list[tuple[str, FinishReason]]:
        return [(text, _reply_reason(finish)) for text, finish in zip(self.texts, self.finish, strict=True)]

    async def updates(self, stream: AsyncIterator[list[RowUpdate]], job: Job, timeout_s: float
                      ) -> AsyncIterator[RowUpdate]:
        """The job's updates until all its rows finished; cancels the job on timeout or disconnect."""
        deadline = time.monotonic() + timeout_s
        try:
            while self.open_rows:
                try:
                    batch = await asyncio.wait_for(anext(stream), max(deadline - time.monotonic(), 0.001))
                except StopAsyncIteration:
                    raise RuntimeError("generation ended before every choice finished") from None
                except asyncio.TimeoutError:
                    raise _timeout(timeout_s) from None
                for update in batch:
                    self.apply(update)
                    yield update
        finally:
            job.cancel()  # no-op once every row finished; else frees the rows in the running batch
            await _close(stream)

    async def collect(self, stream: AsyncIterator[list[RowUpdate]], job: Job, timeout_s: float) -> None:
        async for _ in self.updates(stream, job, timeout_s):
            pass

    async def chunks(self, stream: AsyncIterator[list[RowUpdate]], job: Job, timeout_s: float,
                     include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        if self.chat:
            for row in range(len(self.texts)):
                yield self._event(row, "", None, role=True)
        try:
            async for update in self.updates(stream, job, timeout_s):
                if update.text:
                    yield self._event(update.row, update.text, None)
                if update.finish_reason is not None:
                    yield self._event(update.row, "", _reply_reason(update.finish_reason))
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band, keep serving
            log.exception("generation failed")
            yield f"data: {json.dumps(ApiError(500, f'internal error: {exc}', type='server_error').body())}\n\n"
            return
        if include_usage:
            yield self._usage_event()
        yield "data: [DONE]\n\n"

    def _data(self, chunk: ChatCompletionChunk | CompletionChunk) -> str:
        return f"data: {json.dumps(chunk.model_dump(exclude={'usage'} if chunk.usage is None else None))}\n\n"

    def _usage_event(self) -> str:
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        return self._data(kind(id=self.id, created=self.created, model=self.model, choices=[], usage=self.usage()))

    def _event(self, row: int, text: str, finish: FinishReason | None, role: bool = False) -> str:
        if self.chat:
            delta = Delta(role="assistant", content="") if role else Delta(content=text or None)
            return self._data(ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model,
                choices=[ChatChunkChoice(index=row, delta=delta, finish_reason=finish)]))
        return self._data(CompletionChunk(
            id=self.id, created=self.created, model=self.model,
            choices=[CompletionChunkChoice(index=row, text=text, finish_reason=finish)]))


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
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body(),
                            status_code=500)


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


async def _send_error(send: Any, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
