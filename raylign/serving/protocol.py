"""The HTTP shapes: OpenAI's completions / chat completions / models requests and responses, the
`/v1/score` route, and OpenAI-style error bodies.

Request models are built per server (`request_models`) so that its limits (largest `max_tokens`,
`n`, number of prompts) are part of the published OpenAPI schema and checked by pydantic. As in
OpenAI's API, an unknown parameter is an error, not silently ignored; parameters the API has but this
server does not implement (penalties, logit_bias, suffix, tools, ...) are accepted at their neutral
value (the schema says which) and refused with a 400 otherwise. Extensions beyond OpenAI's API (as vLLM
names them): prompts given as token ids, and `stop_token_ids`. Every rule is in the schema except one
no JSON schema can state: prompt + max_tokens must fit the model's context (in tokens).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from raylign.serving.settings import ServeSettings

MAX_STOP = 4  # stop sequences per request, as in OpenAI's API
MAX_STOP_CHARS = 200
MAX_STOP_TOKEN_IDS = 16
MAX_LOGPROBS = 20  # alternatives per token (OpenAI: top_logprobs <= 20)
LOGPROB_FLOOR = -9999.0  # a log-prob of -inf (JSON has no infinity) is reported as this, as OpenAI does
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """An error answered as an OpenAI error body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- errors and shared response parts ------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


NonEmpty = Annotated[str, StringConstraints(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]

# Parameters of OpenAI's API that this server accepts only at their neutral value (the schema says
# which); any other value is a 400 saying so.
UNSUPPORTED = ("presence_penalty", "frequency_penalty", "logit_bias", "suffix", "tools", "tool_choice",
               "response_format")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


def _valid_unicode(value: Any) -> Any:
    """JSON may escape lone UTF-16 surrogates (e.g. "\\ud800"), which no tokenizer can encode: a 400."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text contains a lone UTF-16 surrogate, which is not valid Unicode") from None
    elif isinstance(value, dict):
        for item in value.values():
            _valid_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _valid_unicode(item)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        return _valid_unicode(data)


class _Request(_Strict):

    model: str | None = Field(None, description="the served model's name (GET /v1/models); default: it")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling; default 1")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"up to {MAX_STOP} stop sequences; the text ends before the first one")
    seed: int | None = Field(None, description="same seed, same request: same answer (any integer)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0, description="not supported (0 only)")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="not supported (0 only)")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported (empty only)")
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(
        None, description=f"extension: up to {MAX_STOP_TOKEN_IDS} token ids that end a choice like EOS does "
        "(the stopping token is not in the text)")

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionFields(_Request):
    """The fields of every server's CompletionRequest; `request_models` redeclares prompt, max_tokens
    and n with the server's limits (a redeclared field keeps its place: the schema's order is this one)."""

    prompt: NonEmpty | list[NonEmpty] | TokenIds | list[TokenIds]
    max_tokens: int | None = DEFAULT_COMPLETION_TOKENS
    n: int = 1
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="report each token's log-prob and its "
                                 "`logprobs` most likely alternatives: log_softmax(logits / T), T = 1 when greedy, "
                                 "before top_p")
    echo: bool | None = Field(None, description="put the prompt before the completion (with its tokens' "
                              "log-probs if `logprobs` is set; the first token has none)")
    suffix: str | None = Field(None, max_length=0, description="not supported")


class ChatCompletionFields(_Request):
    """The fields of every server's ChatCompletionRequest; `request_models` redeclares max_tokens,
    max_completion_tokens and n with the server's limits."""

    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far")
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1
    logprobs: bool | None = Field(None, description="report each token's log-prob: log_softmax(logits / T), T = 1 "
                                  "when greedy, before top_p")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="most likely alternatives per token "
                                     "(used with `logprobs: true` only)")
    response_format: ResponseFormat | None = Field(None, description="text only")
    tools: list[dict[str, Any]] | None = Field(None, max_length=0, description="not supported")
    tool_choice: Literal["none"] | None = Field(None, description="not supported")
    parallel_tool_calls: bool | None = None


def request_models(settings: ServeSettings, vocab_size: int | None = None
                   ) -> tuple[type[CompletionFields], type[ChatCompletionFields]]:
    """(CompletionRequest, ChatCompletionRequest) with this server's limits (and its model's vocabulary,
    for token ids) in their schema."""
    max_tokens_desc = f"tokens to generate, 1..{settings.max_tokens_limit}"
    bound = vocab_size or None  # token ids are < the vocabulary's size
    stop_ids_desc = (f"extension: up to {MAX_STOP_TOKEN_IDS} token ids that end a choice like EOS does "
                     "(the stopping token is not in the text)")

    class CompletionRequest(CompletionFields):
        prompt: (NonEmpty | Annotated[list[NonEmpty], Field(min_length=1, max_length=settings.max_prompts)]
                 | Annotated[list[Annotated[int, Field(ge=0, lt=bound)]], Field(min_length=1)]
                 | Annotated[list[Annotated[list[Annotated[int, Field(ge=0, lt=bound)]], Field(min_length=1)]],
                             Field(min_length=1, max_length=settings.max_prompts)]) = Field(
            description=f"a prompt, or a list of up to {settings.max_prompts}; each a text or a list of token ids")
        max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=0, le=settings.max_tokens_limit,
                                       description=f"tokens to generate, 0..{settings.max_tokens_limit} (0 with "
                                       f"echo and logprobs: score the prompt); default {DEFAULT_COMPLETION_TOKENS}")
        n: int = Field(1, ge=1, le=settings.max_n, description="choices per prompt")
        stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, lt=bound)]],
                                  Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(None, description=stop_ids_desc)

    class ChatCompletionRequest(ChatCompletionFields):
        max_tokens: int | None = Field(None, ge=1, le=settings.max_tokens_limit,
                                       description=f"{max_tokens_desc}; default {settings.default_max_tokens}")
        max_completion_tokens: int | None = Field(None, ge=1, le=settings.max_tokens_limit,
                                                  description="the newer name of max_tokens; wins if both are given")
        n: int = Field(1, ge=1, le=settings.max_n, description="choices")
        stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, lt=bound)]],
                                  Field(max_length=MAX_STOP_TOKEN_IDS)] | None = Field(None, description=stop_ids_desc)

    return CompletionRequest, ChatCompletionRequest


# ---- responses ------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """OpenAI's (legacy) completions log-probs: per token its text, log-prob (None for an echoed
    prompt's first token), most likely alternatives {text: log-prob}, and offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (`usage` only on the last, if asked for)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion (`usage` only on the last, if asked for)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def event_stream_schema(chunk: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI schema of one server-sent event: `data:` is a JSON chunk, an error, or `[DONE]`."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (chunk, ErrorResponse)]
    data = {"anyOf": [{"type": "string", "const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": refs}}]}
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raylign"
    purpose: Literal["generation", "score"] = "generation"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str


class ScorePair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | list[ChatMessage] | None = Field(None, description="text or chat; None scores the completion alone")
    completion: str


class ScoreFields(_Strict):
    """The fields of every server's ScoreRequest; `score_request_model` redeclares them with its limit."""

    model: str | None = None
    pairs: list[ScorePair]


def score_request_model(settings: ServeSettings) -> type[ScoreFields]:
    limit = settings.max_batch_size  # one request fits one scoring batch

    class ScoreRequest(ScoreFields):
        model: str | None = Field(None, description="the reward model's name (GET /v1/models); default: it")
        pairs: list[ScorePair] = Field(min_length=1, max_length=limit,
                                       description=f"(prompt, completion) pairs to score, at most {limit}")

    return ScoreRequest


class Score(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Score]
