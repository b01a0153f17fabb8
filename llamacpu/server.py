"""`llamacpu serve`: an OpenAI-compatible HTTP server over one model (FastAPI on uvicorn).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions`
(streamed as server-sent events or not), in the shapes of OpenAI's API reference, so that the
`openai` package, LangChain or lm-evaluation-harness's `local-completions` work unchanged.
Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.

Request handlers validate, tokenize and format; the model runs in a `scheduler.Scheduler`
thread, which decodes up to `parallel` requests as one batch. Its events reach the handler
through an asyncio queue; a handler whose client went away cancels its job.

Safety: 127.0.0.1 by default; binding elsewhere needs an API key (checked as a Bearer token),
bodies over `max_body` bytes get 413, `max_tokens` is capped by the context left after the
prompt, and a failing request answers with an error while the server carries on.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from .api import LLM, Sampling, TokenLogprob, token_text
from .errors import LlamacpuError
from .scheduler import PARALLEL, Job, Scheduler

API_KEY_ENV = "LLAMACPU_API_KEY"
MAX_BODY = 4 * 1024 * 1024  # bytes: a full 128k-token context of text is well under this


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- request bodies ---------------------------------------------------------------------------

class _Strict(BaseModel):
    # Unknown fields are ignored (clients send many); known ones must have the right JSON type.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampled(_Strict):
    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repeat_penalty: Optional[float] = Field(None, gt=0)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    max_tokens: Optional[int] = Field(None, ge=0)
    n: Optional[int] = Field(None, ge=1, le=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None

    def sampling(self, llm: LLM) -> Sampling:
        return llm.sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                            repeat_penalty=self.repeat_penalty, presence_penalty=self.presence_penalty,
                            frequency_penalty=self.frequency_penalty, seed=self.seed)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class CompletionRequest(_Sampled):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)


# ---- errors -----------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _validate(cls: type[BaseModel], data: Any):
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # Keep the field names of the location; drop pydantic's union-branch tags ("str", "list[...]").
        fields_ = cls.model_fields
        loc = [str(p) for p in err["loc"]]
        names = [loc[0]] + [p for p in loc[1:] if p.isdigit() or not re.fullmatch(r"[a-z]+\[.*\]|str|int|float|bool", p)]
        param = ".".join(names) if names and names[0] in fields_ else None
        raise ApiError(400, f"{param or 'body'}: {err['msg']}", param=param, code="invalid_value") from None


async def _read_json(request, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


# ---- the app ----------------------------------------------------------------------------------

class _Events:
    """The asyncio end of a job: the scheduler thread's events, in order."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def deliver(self, event: tuple) -> None:  # called from the scheduler thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            pass

    async def __aiter__(self) -> AsyncIterator[tuple]:
        while True:
            event = await self.queue.get()
            yield event
            if event[0] in ("done", "error"):
                return


class _CollapseSlashes:
    """ASGI middleware: `/v1//models` routes as `/v1/models` (clients join base URLs sloppily)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "//" in scope["path"]:
            path = re.sub(r"/{2,}", "/", scope["path"])
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


def create_app(llm: LLM, *, parallel: int = PARALLEL, api_key: str | None = None, max_body: int = MAX_BODY):
    """The FastAPI app serving `llm`; its lifespan starts and stops the scheduler thread."""
    scheduler = Scheduler(llm, parallel)
    created = int(time.time())
    name = llm.name

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="llamacpu", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_CollapseSlashes)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind=kind).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        return JSONResponse(ApiError(400, str(e)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse(ApiError(500, f"{type(e).__name__}: {e}", kind="server_error").body(), status_code=500)

    def check_key(request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "llamacpu"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": len(scheduler.active), "queued": scheduler.jobs.qsize(),
                "slots": len(scheduler.slots), "max_batch": scheduler.max_batch}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_key(request)
        if model_id != name:
            raise ApiError(404, f"no model {model_id!r}; this server has {name!r}", param="model",
                           code="model_not_found", kind="not_found_error")
        return model_card()

    def budget(req: _Sampled, n_prompt: int, requested: int | None) -> int:
        """max_tokens, capped by the context left after the prompt."""
        room = llm.ctx - n_prompt
        if room < 1:
            raise ApiError(400, f"the prompt has {n_prompt} tokens; the context holds {llm.ctx}",
                           param="messages" if isinstance(req, ChatRequest) else "prompt",
                           code="context_length_exceeded")
        return room if requested is None else min(requested, room)

    def submit(ids: list[int], req: _Sampled, max_tokens: int, logprobs: int | None, echo: bool) -> tuple[Job, _Events]:
        try:
            sampling = req.sampling(llm)
        except LlamacpuError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        events = _Events()
        job = Job(ids, sampling, max_tokens, events.deliver, req.stops(), logprobs, echo and logprobs is not None)
        scheduler.submit(job)
        return job, events

    async def watch(request: Request, jobs: list[Job]) -> None:
        """Cancel `jobs` when the client goes away (for responses that send nothing until the end)."""
        while not all(j.cancelled.is_set() for j in jobs):
            if await request.is_disconnected():
                for j in jobs:
                    j.cancelled.set()
                return
            await asyncio.sleep(0.25)

    # ---- /v1/chat/completions ----

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = _validate(ChatRequest, await _read_json(request, max_body))
        try:
            ids = llm.encode_chat([m.as_dict() for m in req.messages])
        except LlamacpuError as e:
            raise ApiError(400, str(e), param="messages") from None
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if requested == 0:
            raise ApiError(400, "max_tokens must be at least 1", param="max_tokens", code="invalid_value")
        top = (req.top_logprobs or 0) if req.logprobs else None
        job, events = submit(ids, req, budget(req, len(ids), requested), top, False)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": now, "model": name}
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return _sse(request, job, _chat_chunks(events, head, usage))
        watcher = asyncio.create_task(watch(request, [job]))
        try:
            text, content, finish, usage = "", [], "stop", None
            async for ev in events:
                if ev[0] == "token":
                    text += ev[2]
                    if ev[3] is not None:
                        content.append(_chat_logprob(llm.tokenizer, ev[3]))
                elif ev[0] == "done":
                    finish, usage = ev[1], _usage(ev[2], ev[3], ev[4])
                elif ev[0] == "error":
                    raise ApiError(ev[2], ev[1], kind=_kind(ev[2]))
        finally:
            watcher.cancel()
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": {"content": content} if top is not None else None,
                             "finish_reason": finish}],
                "usage": usage}

    async def _chat_chunks(events: _Events, head: dict, include_usage: bool) -> AsyncIterator[dict]:
        def chunk(delta: dict, finish=None, logprobs=None) -> dict:
            c = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
            return {**c, "usage": None} if include_usage else c
        yield chunk({"role": "assistant", "content": ""})
        async for ev in events:
            if ev[0] == "token":
                if ev[2] or ev[3] is not None:
                    yield chunk({"content": ev[2]},
                                logprobs=None if ev[3] is None else {"content": [_chat_logprob(llm.tokenizer, ev[3])]})
            elif ev[0] == "done":
                yield chunk({}, finish=ev[1])
                if include_usage:
                    yield {**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(ev[2], ev[3], ev[4])}
            elif ev[0] == "error":
                yield ApiError(ev[2], ev[1], kind=_kind(ev[2])).body()

    # ---- /v1/completions ----

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_key(request)
        req = _validate(CompletionRequest, await _read_json(request, max_body))
        prompts = _prompts(req.prompt)
        ids_list = []
        for p in prompts:
            ids = llm.tokenize(p) if isinstance(p, str) else p
            if not ids:
                raise ApiError(400, "the prompt is empty (no tokens)", param="prompt")
            if max(ids) >= llm.runtime.config.vocab_size or min(ids) < 0:
                raise ApiError(400, "a prompt token id is out of the vocabulary", param="prompt")
            ids_list.append(ids)
        if req.max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens 0 needs echo (it would return nothing)", param="max_tokens")
        requested = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
        submitted = [submit(ids, req, budget(req, len(ids), requested), req.logprobs, bool(req.echo))
                     for ids in ids_list]
        jobs = [job for job, _ in submitted]
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": name}
        texts = [p if isinstance(p, str) else llm.detokenize(p) for p in prompts]
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            return _sse(request, jobs, _completion_chunks(submitted, ids_list, texts, req, head, usage))
        watcher = asyncio.create_task(watch(request, jobs))
        try:
            choices, prompt_tokens, completion_tokens, cached_tokens = [], 0, 0, 0
            for i, (job, events) in enumerate(submitted):
                choice = _Choice(llm.tokenizer, ids_list[i], texts[i], req)
                async for ev in events:
                    if ev[0] == "error":
                        raise ApiError(ev[2], ev[1], kind=_kind(ev[2]))
                    choice.add(ev)
                choices.append({"index": i, **choice.result()})
                prompt_tokens += choice.prompt_tokens
                completion_tokens += choice.completion_tokens
                cached_tokens += choice.cached_tokens
        finally:
            watcher.cancel()
        return {**head, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens, cached_tokens)}

    async def _completion_chunks(submitted, ids_list, texts, req, head, include_usage) -> AsyncIterator[dict]:
        prompt_tokens = completion_tokens = cached_tokens = 0
        for i, (job, events) in enumerate(submitted):
            choice = _Choice(llm.tokenizer, ids_list[i], texts[i], req)
            async for ev in events:
                if ev[0] == "error":
                    yield ApiError(ev[2], ev[1], kind=_kind(ev[2])).body()
                    return
                part = choice.add(ev)
                if part is not None:
                    c = {**head, "choices": [{"index": i, **part}]}
                    yield {**c, "usage": None} if include_usage else c
            prompt_tokens += choice.prompt_tokens
            completion_tokens += choice.completion_tokens
            cached_tokens += choice.cached_tokens
        if include_usage:
            yield {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens, cached_tokens)}

    def _sse(request: Request, jobs: Job | list[Job], chunks: AsyncIterator[dict]):
        jobs = jobs if isinstance(jobs, list) else [jobs]

        async def body():
            watcher = asyncio.create_task(watch(request, jobs))
            try:
                async for c in chunks:
                    yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # also when the client went away mid-stream: stop generating for it
                watcher.cancel()
                for j in jobs:
                    j.cancelled.set()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _prompts(prompt) -> list:
    """A completion request's prompt(s): a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    return list(prompt)


def _kind(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def _usage(prompt: int, completion: int, cached: int) -> dict:
    """OpenAI's usage object; `cached` prompt tokens came from a KV cache (a shared prefix)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _chat_logprob(tokenizer, e: TokenLogprob) -> dict:
    """A token's entry of `choices[].logprobs.content` in the chat shape."""
    def one(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {**one(e.text, e.logprob), "top_logprobs": [one(token_text(tokenizer, i), lp) for i, lp in e.top]}


class _Choice:
    """One completion choice in the legacy shape, built from its job's events: text (after the
    prompt if `echo`) and, with `logprobs`, {tokens, token_logprobs, top_logprobs, text_offset},
    text offsets counting from the start of the prompt."""

    def __init__(self, tokenizer, ids: list[int], prompt_text: str, req: CompletionRequest):
        self.tokenizer, self.ids, self.req = tokenizer, ids, req
        self.echo, self.want_logprobs = bool(req.echo), req.logprobs is not None
        self.text = prompt_text if self.echo else ""
        self.offset = len(prompt_text)  # characters before the next generated token
        self.decoder = tokenizer.stream_decoder(continuation=True)
        self.lp = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.finish, self.prompt_tokens, self.completion_tokens, self.cached_tokens = None, len(ids), 0, 0

    def _add_entries(self, entries: list[TokenLogprob], offsets: list[int]) -> dict:
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e, off in zip(entries, offsets):
            part["tokens"].append(e.text)
            part["token_logprobs"].append(e.logprob)
            part["top_logprobs"].append(None if e.logprob is None else
                                        {token_text(self.tokenizer, i): lp for i, lp in e.top})
            part["text_offset"].append(off)
        for k in self.lp:
            self.lp[k] += part[k]
        return part

    def add(self, ev: tuple) -> dict | None:
        """Take one event; return the streamed chunk's choice for it (None: nothing to send)."""
        if ev[0] == "prompt":
            dec, offsets, n = self.tokenizer.stream_decoder(continuation=False), [], 0
            for e in ev[1]:
                offsets.append(n)
                n += len(dec.push(e.id))
            part = self._add_entries(ev[1], offsets)
            return {"text": self.text, "logprobs": part, "finish_reason": None}
        if ev[0] == "token":
            _, token, piece, entry = ev
            part = None
            if token is not None and entry is not None:
                part = self._add_entries([entry], [self.offset])
            if token is not None:
                self.offset += len(self.decoder.push(token))
            self.text += piece
            if not piece and part is None:
                return None
            return {"text": piece, "logprobs": part, "finish_reason": None}
        if ev[0] == "done":
            self.finish, self.completion_tokens, self.cached_tokens = ev[1], ev[3], ev[4]
            return {"text": "", "logprobs": None, "finish_reason": ev[1]}
        return None

    def result(self) -> dict:
        return {"text": self.text, "logprobs": self.lp if self.want_logprobs else None, "finish_reason": self.finish}


def serve(llm: LLM, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          parallel: int = PARALLEL, max_body: int = MAX_BODY, access_log: bool = False,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve `llm` until SIGINT/SIGTERM; then finish the requests in flight and return."""
    import uvicorn
    if not is_loopback(host) and not api_key:
        raise LlamacpuError(f"serving on {host} (beyond this machine) needs an API key: --api-key KEY "
                            f"or {API_KEY_ENV}")
    if not 0 <= port <= 65535:
        raise LlamacpuError(f"port must be in 0..65535, got {port}")
    app = create_app(llm, parallel=parallel, api_key=api_key, max_body=max_body)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=access_log,
                            timeout_graceful_shutdown=60, lifespan="on")
    server = uvicorn.Server(config)
    if on_ready is not None:
        _when_started(server, lambda: on_ready(f"http://{host if ':' not in host else f'[{host}]'}:{port}"))
    server.run()


def _when_started(server, callback: Callable[[], None]) -> None:
    """Call `callback` once uvicorn listens (it has no hook for that: poll its flag)."""
    def poll():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            callback()
    threading.Thread(target=poll, daemon=True).start()
