"""An OpenAI-compatible HTTP server (FastAPI on uvicorn) over the
continuous-batching :class:`~moe_infinity.serving.Scheduler`.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``
(streaming by server-sent events with ``stream: true``), ``/health`` and
``/metrics`` (Prometheus text format). Errors use the OpenAI error shape
``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed
body, an unknown field or a prompt past the context, 404 for another model
name, 429 when the queue is full, 503 while shutting down.

Life cycle (``python -m moe_infinity serve``): the first SIGTERM or SIGINT
stops accepting requests (503), lets the running ones finish for up to the
shutdown timeout and cancels the rest, then closes the model, which saves
its trace when it has a ``trace_path``. A second signal exits at once. A
client that disconnects mid-request cancels it: its batch place frees at
the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ClosedError, InvalidArgumentError, MissingDependencyError, OverloadedError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover — the serve extra is missing
    raise MissingDependencyError(f"the server needs FastAPI and uvicorn: pip install 'moe_infinity[serve]' ({e})") from e

from . import metrics
from .protocol import ChatCompletionRequest, CompletionRequest, error_body
from .scheduler import Event, SamplingParams, Scheduler
from .text import Detokenizer, StopStrings

__all__ = ["DEFAULT_CHAT_TEMPLATE", "Lifecycle", "build_app", "load_model", "serve"]

log = logging.getLogger("moe_infinity.serving")

#: The chat template for tokenizers that have none (the built-in model's):
#: one ``role: content`` line per message, then ``assistant:`` for the reply.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code if self.code is not None else self.status)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry on another replica", "service_unavailable")


def _from_engine(e: Exception, param: str | None = None) -> ApiError:
    if isinstance(e, OverloadedError):
        return ApiError(429, str(e), "rate_limit_error", None, "rate_limit_exceeded")
    if isinstance(e, ClosedError):
        return _shutting_down()
    if isinstance(e, InvalidArgumentError):
        return ApiError(400, str(e), "invalid_request_error", param)
    return ApiError(500, f"{type(e).__name__}: {e}", "server_error")


class Lifecycle:
    """Draining and closing one server's scheduler (and model, when the
    server owns it). Thread-safe and idempotent.

    Args:
        model: the model (closed by close() when ``owns_model``; closing
            saves its trace).
        scheduler: its scheduler.
        shutdown_timeout: seconds running requests may take to finish once
            draining starts; the rest are cancelled.
        owns_model: close the model in close().
    """

    def __init__(self, model: Any, scheduler: Scheduler, shutdown_timeout: float = 30.0, owns_model: bool = True):
        self.model = model
        self.scheduler = scheduler
        self.shutdown_timeout = shutdown_timeout
        self.owns_model = owns_model
        self.draining = False
        self.closed = False
        self._lock = threading.Lock()

    def drain(self) -> None:
        """Refuses new requests (503) and waits for the running ones (up to
        the timeout; the rest are cancelled)."""
        self.draining = True
        self.scheduler.close(self.shutdown_timeout)

    def close(self) -> None:
        """drain(), then closes the model when the server owns it. A model
        that requests still run on (a forced exit cut the drain short) is
        left open: closing it would pull its memory from under them."""
        with self._lock:
            if self.closed:
                return
            self.drain()
            if self.scheduler.running:
                log.warning("moe-infinity: %d requests still running: the model is left open and its trace not saved", self.scheduler.running)
                return
            if self.owns_model:
                self.model.close()
            self.closed = True


@dataclass
class _Piece:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    error: BaseException | None = None


@dataclass
class _Job:
    """One request in flight: the scheduler's request, its events on the
    event loop, and its text so far."""

    req: Any
    events: asyncio.Queue[Event]
    detok: Detokenizer
    stops: StopStrings
    prompt_tokens: int
    completion_tokens: int = 0
    done: bool = False
    ids: list[int] = field(default_factory=list)


class _Server:
    """The app's state and request handling."""

    def __init__(self, model: Any, tokenizer: Any, scheduler: Scheduler, model_name: str, lifecycle: Lifecycle, chat_template: str | None):
        self.model = model
        self.tok = tokenizer
        self.sched = scheduler
        self.name = model_name
        self.life = lifecycle
        self.created = int(time.time())
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        self.vocab = int(getattr(model.config, "vocab_size", 0) or 0) or None
        self.http = metrics.HTTPCounter()
        self.hists = {
            "time_to_first_token_seconds": ("Seconds from a request's arrival to its first token.", metrics.Histogram()),
            "request_latency_seconds": ("Seconds from a request's arrival to its last token.", metrics.Histogram()),
            "time_per_output_token_seconds": ("Mean seconds between a request's tokens after the first.", metrics.Histogram()),
        }

    # -- requests ---------------------------------------------------------------

    def _check_model(self, body: Any) -> None:
        if body.model != self.name:
            raise ApiError(404, f"The model `{body.model}` does not exist; this server serves `{self.name}`.", "invalid_request_error", "model", "model_not_found")
        if body.n != 1:
            raise ApiError(400, f"n must be 1 (got {body.n}); send several requests instead", "invalid_request_error", "n")
        for s in body.stop_list():
            if not s:
                raise ApiError(400, "stop strings must not be empty", "invalid_request_error", "stop")

    def _params(self, body: Any, prompt_ids: list[int], max_tokens: int | None) -> SamplingParams:
        if max_tokens is None:
            max_tokens = max(1, (self.sched.context_length or len(prompt_ids) + 256) - len(prompt_ids))
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos)

    def _submit(self, prompt_ids: list[int], params: SamplingParams, stops: list[str], request_id: str, param: str) -> _Job:
        if self.life.draining:
            raise _shutting_down()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def on_event(ev: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(events.put_nowait, ev)

        try:
            self.sched.check(prompt_ids, params)
        except InvalidArgumentError as e:
            raise _from_engine(e, param) from e
        try:
            req = self.sched.submit(prompt_ids, params, on_event, request_id=request_id)
        except Exception as e:  # noqa: BLE001 — every engine error becomes an HTTP error
            raise _from_engine(e, param) from e
        return _Job(req, events, Detokenizer(self.tok, prompt_ids), StopStrings(stops), len(prompt_ids))

    async def _pieces(self, job: _Job, disconnected: Callable[[], Any] | None = None) -> AsyncIterator[_Piece]:
        """The request's text as it comes; the last piece has the finish
        reason. Leaving early (a stop string, a client gone) cancels it."""
        try:
            while True:
                if disconnected is None:
                    ev = await job.events.get()
                else:
                    try:
                        ev = await asyncio.wait_for(job.events.get(), 0.5)
                    except asyncio.TimeoutError:
                        if await disconnected():
                            return
                        continue
                if ev.token is not None:
                    job.completion_tokens += 1
                    job.ids.append(ev.token)
                    text = job.stops.push(job.detok.add(ev.token))
                    if job.stops.stopped:
                        job.req.cancel()
                        job.done = True
                        self._observe(job.req)
                        yield _Piece(text, [ev.token], "stop")
                        return
                    yield _Piece(text, [ev.token])
                    continue
                job.done = True
                reason = ev.finish_reason
                text = ""
                if reason in ("stop", "length"):
                    text = job.stops.push(job.detok.flush())
                    if job.stops.stopped:
                        reason = "stop"
                    else:
                        text += job.stops.flush()
                    self._observe(job.req)
                yield _Piece(text, [], reason, ev.error)
                return
        finally:
            if not job.done:
                job.req.cancel()

    def _observe(self, req: Any) -> None:
        now = time.monotonic()
        if req.first_token is not None:
            self.hists["time_to_first_token_seconds"][1].observe(req.first_token - req.submitted)
            n = len(req.tokens)
            if n > 1:
                self.hists["time_per_output_token_seconds"][1].observe((now - req.first_token) / (n - 1))
        self.hists["request_latency_seconds"][1].observe(now - req.submitted)

    @staticmethod
    def _failure(piece: _Piece, n_tokens: int) -> ApiError | None:
        if piece.finish_reason == "cancelled":
            return ApiError(503, f"the request was cancelled after {n_tokens} tokens: the server is shutting down", "service_unavailable")
        if piece.finish_reason == "error":
            e = piece.error
            return ApiError(500, f"generation failed: {type(e).__name__}: {e}" if e else "generation failed", "server_error")
        return None

    def _usage(self, job: _Job) -> dict[str, int]:
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens, "total_tokens": job.prompt_tokens + job.completion_tokens}

    # -- endpoints ----------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._check_model(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request (got {len(prompt)}); send several requests instead", "invalid_request_error", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = list(self.tok(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if t < 0 or (self.vocab is not None and t >= self.vocab)]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{(self.vocab or 1) - 1})", "invalid_request_error", "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        job = self._submit(ids, self._params(body, ids, body.max_tokens), body.stop_list(), rid, "prompt")
        created = int(time.time())

        def choice(p: _Piece, text: str, ids_: list[int]) -> dict[str, Any]:
            c: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": p.finish_reason if p.finish_reason != "cancelled" else None}
            if body.return_token_ids:
                c["token_ids"] = ids_
            return c

        base = {"id": rid, "object": "text_completion", "created": created, "model": self.name}
        if not body.stream:
            return await self._collect(job, base, request, lambda last, text: choice(last, text, job.ids), body.return_token_ids, ids)

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            async for p in self._pieces(job):
                if (err := self._failure(p, job.completion_tokens)) is not None:
                    yield err.body()
                    return
                if p.text or p.finish_reason or (body.return_token_ids and p.token_ids):
                    yield {**base, "choices": [choice(p, p.text, p.token_ids)]}
            if body.stream_options and body.stream_options.include_usage:
                yield {**base, "choices": [], "usage": self._usage(job)}

        return _sse(chunks(), job)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._check_model(body)
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tok.apply_chat_template(msgs, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 — a template's own error (say, roles it does not accept)
            raise ApiError(400, f"the chat template refused these messages: {e}", "invalid_request_error", "messages") from e
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = self._submit(ids, self._params(body, ids, max_tokens), body.stop_list(), rid, "messages")
        created = int(time.time())
        base = {"id": rid, "object": "chat.completion", "created": created, "model": self.name}

        def finish(p: _Piece) -> str | None:
            return p.finish_reason if p.finish_reason != "cancelled" else None

        if not body.stream:

            def choice(last: _Piece, text: str) -> dict[str, Any]:
                c: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish(last)}
                if body.return_token_ids:
                    c["token_ids"] = job.ids
                return c

            return await self._collect(job, base, request, choice, body.return_token_ids, ids)

        cbase = {**base, "object": "chat.completion.chunk"}

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            yield {**cbase, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
            async for p in self._pieces(job):
                if (err := self._failure(p, job.completion_tokens)) is not None:
                    yield err.body()
                    return
                if p.text or p.finish_reason or (body.return_token_ids and p.token_ids):
                    c: dict[str, Any] = {"index": 0, "delta": {"content": p.text} if p.text else {}, "logprobs": None, "finish_reason": finish(p)}
                    if body.return_token_ids:
                        c["token_ids"] = p.token_ids
                    yield {**cbase, "choices": [c]}
            if body.stream_options and body.stream_options.include_usage:
                yield {**cbase, "choices": [], "usage": self._usage(job)}

        return _sse(chunks(), job)

    async def _collect(self, job: _Job, base: dict[str, Any], request: Request, choice: Callable[[_Piece, str], dict[str, Any]], token_ids: bool, prompt_ids: list[int]) -> Any:
        parts: list[str] = []
        last = None
        async for p in self._pieces(job, request.is_disconnected):
            parts.append(p.text)
            last = p
        if last is None:  # the client went away
            return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)
        if (err := self._failure(last, job.completion_tokens)) is not None:
            raise err
        out = {**base, "choices": [choice(last, "".join(parts))], "usage": self._usage(job)}
        if token_ids:
            out["prompt_token_ids"] = prompt_ids
        return out

    # -- state --------------------------------------------------------------------

    def health(self) -> JSONResponse:
        if self.life.draining or getattr(self.model.moe_runtime, "closed", False):
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok", "running": self.sched.running, "queued": self.sched.queued})

    def metrics_text(self) -> str:
        rt = self.model.moe_runtime
        moe = None if rt.closed else self.model.moe_stats()
        return metrics.render(self.sched.stats(), moe, self.http, self.hists, self.life.draining)


class _CancellingStream(StreamingResponse):
    """A stream that cancels its request however it ends: finished, the
    client gone (the next send fails, or the disconnect arrives), or the
    server's task cancelled."""

    def __init__(self, content: AsyncIterator[bytes], job: _Job):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.done:
                self.job.req.cancel()


def _sse(chunks: AsyncIterator[dict[str, Any]], job: _Job) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for c in chunks:
                yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n".encode()
            yield b"data: [DONE]\n\n"
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    return _CancellingStream(body(), job)


class _Middleware:
    """Counts responses by path and status, and answers 503 to new API
    requests while the server drains (pure ASGI, so streams pass through
    untouched)."""

    def __init__(self, app: Any, server: _Server):
        self.app = app
        self.server = server

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        known = path if path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics") else "other"
        if self.server.life.draining and path.startswith("/v1/"):
            self.server.http.add(known, 503)
            await _shutting_down().response()(scope, receive, send)
            return

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.server.http.add(known, int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request body", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unknown field '{param}': this server does not support it", param
    if kind == "missing":
        return f"missing required field '{param}'", param
    if kind == "model_attributes_type" or (not loc and kind.endswith("_type")):
        return "the body must be a JSON object", None
    return f"{param}: {e.get('msg')}" if param else str(e.get("msg")), param


def build_app(
    model: Any,
    tokenizer: Any,
    scheduler: Scheduler,
    model_name: str,
    *,
    chat_template: str | None = None,
    lifecycle: Lifecycle | None = None,
) -> FastAPI:
    """The OpenAI-compatible app for one model.

    Args:
        model: a model from ``moe_infinity.from_pretrained``.
        tokenizer: its tokenizer.
        scheduler: the model's :class:`Scheduler`.
        model_name: the name clients put in ``model`` (and ``/v1/models`` lists).
        chat_template: a Jinja chat template overriding the tokenizer's
            (default: the tokenizer's, else :data:`DEFAULT_CHAT_TEMPLATE`).
        lifecycle: drains and closes the server; the app's shutdown calls
            its ``close()`` (default: a Lifecycle that leaves the model open).
    """
    life = lifecycle or Lifecycle(model, scheduler, owns_model=False)
    srv = _Server(model, tokenizer, scheduler, model_name, life, chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(life.close)

    app = FastAPI(title="moe_infinity", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.state.lifecycle = life

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param = _validation_message(exc)
        return ApiError(400, msg, "invalid_request_error", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error").response()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": srv.created, "owned_by": "moe_infinity", "max_model_len": scheduler.context_length}],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await srv.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await srv.chat(body, request)

    @app.get("/health")
    async def health() -> JSONResponse:
        return srv.health()

    @app.get("/metrics")
    async def prom() -> PlainTextResponse:
        return PlainTextResponse(srv.metrics_text(), media_type=metrics.CONTENT_TYPE)

    app.add_middleware(_Middleware, server=srv)
    return app


def load_model(
    path: str | Path | None = None,
    *,
    device: str = "auto",
    device_memory: int | float | str = 0.5,
    cache_policy: str = "priority",
    prefetch: bool = True,
    trace_path: str | Path | None = None,
) -> tuple[Any, Any]:
    """Loads a model and its tokenizer for serving, as ``moe-infinity
    generate`` does (no path: the built-in model, in float32 on a CPU)."""
    import torch
    from transformers import AutoTokenizer

    from ..builtin import builtin_model_dir
    from ..loading import _resolve_device, from_pretrained

    where = str(path) if path else str(builtin_model_dir())
    dev = _resolve_device(device)
    model = from_pretrained(
        where,
        device=dev,
        device_memory=device_memory,
        cache_policy=cache_policy,
        prefetch=prefetch,
        trace_path=trace_path,
        # The built-in model is stored in bfloat16; float32 is faster on CPUs.
        dtype=None if path or dev.type != "cpu" else torch.float32,
    )
    try:
        tok = AutoTokenizer.from_pretrained(where)
    except BaseException:
        model.close()
        raise
    return model, tok


class _Uvicorn:
    """uvicorn's Server, with its signal handling replaced: the first signal
    drains (503 to new requests, running ones finish or are cancelled within
    the timeout) before uvicorn stops; a second one exits at once."""

    @staticmethod
    def make(config: Any, life: Lifecycle, on_ready: Callable[[Any], None] | None) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:  # noqa: ARG002
                # Not recorded in _captured_signals: uvicorn would re-raise
                # it after serving, and the process would die by the signal
                # instead of exiting 0 after a clean shutdown.
                if life.draining:
                    self.force_exit = self.should_exit = True
                    return
                life.draining = True
                log.warning("moe-infinity: shutting down: refusing new requests, finishing running ones (up to %.0f s)", life.shutdown_timeout)

                def drain() -> None:
                    try:
                        life.drain()
                    finally:
                        self.should_exit = True

                threading.Thread(target=drain, name="moe_infinity-drain", daemon=True).start()

            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets=sockets)
                if on_ready is not None and not self.should_exit:
                    on_ready(self)

        return Server(config)


def serve(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Runs the app with uvicorn until a signal drains and closes it (the
    app's lifecycle closes the model on the way out). ``port=0`` picks a
    free port; ``on_ready`` receives the base URL once it listens."""
    import socket

    import uvicorn

    life: Lifecycle = app.state.lifecycle
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on")
    url = f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    server = _Uvicorn.make(config, life, (lambda _s: on_ready(url)) if on_ready else None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        life.close()  # a forced exit skips the app's shutdown
