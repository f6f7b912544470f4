"""The HTTP side of `tuneforge serve`: an OpenAI-compatible API on FastAPI + uvicorn (imported by the command only).

GET /v1/models, POST /v1/chat/completions and /v1/completions (stream true/false: server-sent events in OpenAI's chunk
format, ending with `data: [DONE]`), GET /health, GET /tuneforge/stats (the batcher's counters), and with
--allow-adapter-loading vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (hot-loading onto the base).
Requests are parsed here (every mistake a 4xx in OpenAI's error shape, and the server goes on) and answered by the
batcher (serve_batch.py). Chat prompts go through the served name's own chat template, as `tuneforge generate`
renders them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tuneforge.deploy.serve_batch import ApiError, Batcher, Control, Job

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_PROMPTS = 64  # /v1/completions with a list of prompts
MAX_QUEUED = 1024  # prompts waiting for the worker; past it new requests get a 503 instead of piling up
ROLES = ("system", "user", "assistant", "tool", "developer")
# Request fields that would change the answer and that this server does not do; refused rather than ignored.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
               "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "n": (None, 1)}


def build_app(served, batcher: Batcher, *, api_key: str | None = None, allow_adapter_loading: bool = False) -> FastAPI:
    app = FastAPI(title="tuneforge serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):  # unknown route (404), wrong method (405)
        return JSONResponse(ApiError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                                     code=str(exc.status_code)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(ApiError(400, f"invalid request: {problems}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request, exc: Exception):
        return JSONResponse(_internal(exc).body(), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(ApiError(401, "Incorrect API key provided (Authorization: Bearer KEY).",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/tuneforge/stats")
    async def stats():
        return dict(batcher.stats)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "tuneforge",
             "root": served.base_name, "parent": None if name == served.base_name else served.base_name,
             "max_model_len": served.max_model_len} for name in served.entries]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request)
        entry = _served(served, body)
        messages = _messages(body)
        prompt = _chat_prompt(entry.tokenizer, messages)
        return await _answer(body, entry, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request)
        entry = _served(served, body)
        return await _answer(body, entry, _prompts(body), chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        """Hot-load an adapter onto the running base (vLLM's endpoint and fields); needs --allow-adapter-loading."""
        from tuneforge.deploy.serve import add_adapter

        body = await _adapter_request(request)
        name, path = body["lora_name"], _string(body, "lora_path")
        await _on_worker(lambda: add_adapter(served, name, path))
        return {"object": "model", "id": name, "parent": served.base_name, "loaded": True}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        from tuneforge.deploy.serve import remove_adapter

        body = await _adapter_request(request)
        if body["lora_name"] not in served.entries:
            raise ApiError(404, f"The model `{body['lora_name']}` is not served.", param="lora_name",
                           code="model_not_found")
        await _on_worker(lambda: remove_adapter(served, body["lora_name"]))
        return {"object": "model", "id": body["lora_name"], "loaded": False}

    async def _adapter_request(request) -> dict:
        if not allow_adapter_loading:
            raise ApiError(403, "loading and unloading adapters is off; start the server with "
                           "--allow-adapter-loading", code="adapter_loading_disabled")
        body = await _read_json(request)
        _string(body, "lora_name")
        return body

    async def _on_worker(action):
        """Run `action` on the worker thread between batches (the model is never changed mid-generation)."""
        from tuneforge.errors import TuneforgeError

        events: asyncio.Queue = asyncio.Queue()
        batcher.submit(Control(action, _emitter(asyncio.get_running_loop(), events, 0)))
        _, kind, payload = await events.get()
        if kind == "error":
            if isinstance(payload, TuneforgeError):
                raise ApiError(400, payload.render(), param="lora_path", code="adapter_load_failed")
            raise _internal(payload)
        return payload

    async def _answer(body: dict, entry, prompts: list[str], *, chat: bool):
        """Submit one job per prompt, wait until each is admitted (or refused: a 4xx before any streaming), then
        answer whole or as a stream."""
        options = _options(body)
        if batcher.queue.qsize() + len(prompts) > MAX_QUEUED:
            raise ApiError(503, f"the server is busy ({batcher.queue.qsize()} prompts waiting); retry later",
                           kind="server_error", code="server_busy")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for index, prompt in enumerate(prompts):
            emit = _emitter(loop, events, index)
            jobs.append(Job(entry, prompt, options["max_tokens"], options["stop"], options["stream"], emit,
                            param="messages" if chat else "prompt"))
        for job in jobs:
            batcher.submit(job)
        reply = _Reply(entry.name, chat)
        try:
            admitted = 0
            while admitted < len(jobs):
                index, kind, payload = await events.get()
                if kind == "error":
                    raise payload if isinstance(payload, ApiError) else _internal(payload)
                admitted += kind == "admitted"
                reply.take(index, kind, payload, keep=True)  # a job may stream before the others are admitted
        except BaseException:
            _cancel(jobs)
            raise
        if not options["stream"]:
            try:
                while len(reply.done) < len(jobs):
                    index, kind, payload = await events.get()
                    if kind == "error":
                        raise payload if isinstance(payload, ApiError) else _internal(payload)
                    reply.take(index, kind, payload)
            finally:
                _cancel(jobs)
            return reply.whole()

        async def stream():
            try:
                for text in [reply.opening(), *(reply.chunk(*item) for item in reply.pending)]:
                    if text:
                        yield text
                while len(reply.done) < len(jobs):
                    index, kind, payload = await events.get()
                    if kind == "error":
                        yield _sse((payload if isinstance(payload, ApiError) else _internal(payload)).body())
                        break
                    reply.take(index, kind, payload)
                    if text := reply.chunk(index, kind, payload):
                        yield text
                else:
                    if options["include_usage"]:
                        yield reply.usage_chunk()
                yield "data: [DONE]\n\n"
            finally:
                _cancel(jobs)  # the client went away: its rows stop at their next token

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


class _Reply:
    """The OpenAI response (whole, or as chunks) for one request's jobs."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.done: dict[int, dict] = {}
        self.pending: list[tuple] = []  # events that came while waiting for admission, streamed first

    def take(self, index: int, kind: str, payload, *, keep: bool = False) -> None:
        """Record a finished job; `keep`: also hold the event to stream it later."""
        if kind == "done":
            self.done[index] = payload
        if keep and kind in ("delta", "done"):
            self.pending.append((index, kind, payload))

    def _head(self, chunk: bool) -> dict:
        kind = "chat.completion.chunk" if chunk and self.chat else "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _usage(self) -> dict:
        prompt = sum(d["prompt_tokens"] for d in self.done.values())
        completion = sum(d["completion_tokens"] for d in self.done.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def whole(self) -> dict:
        choices = []
        for index in sorted(self.done):
            result = self.done[index]
            choice = {"index": index, "logprobs": None, "finish_reason": result["finish_reason"]}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": result["text"]}
            else:
                choice["text"] = result["text"]
            choices.append(choice)
        return {**self._head(False), "choices": choices, "usage": self._usage()}

    def opening(self) -> str:
        if not self.chat:
            return ""
        return _sse({**self._head(True), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}]})

    def chunk(self, index: int, kind: str, payload) -> str:
        if kind == "admitted":
            return ""
        text = payload if kind == "delta" else ""
        finish = payload["finish_reason"] if kind == "done" else None
        if self.chat:
            choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return _sse({**self._head(True), "choices": [choice]})

    def usage_chunk(self) -> str:
        return _sse({**self._head(True), "choices": [], "usage": self._usage()})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled = True


def _emitter(loop, events: asyncio.Queue, index: int):
    """What the worker thread calls to hand an event to this request's handler."""
    def emit(kind: str, payload) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody is waiting
            pass
    return emit


def _string(body: dict, key: str) -> str:
    value = _required(body, key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{key}' must be a non-empty string", param=key, code="invalid_type")
    return value


def _internal(exc: BaseException) -> ApiError:
    return ApiError(500, f"internal error while generating: {type(exc).__name__}: {str(exc)[:300]}",
                    kind="server_error", code="internal_error")


async def _read_json(request) -> dict:
    """The body as a JSON object, read at most MAX_BODY_BYTES."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is {int(length):,} bytes; the limit is {MAX_BODY_BYTES:,}",
                       code="request_too_large")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over the limit of {MAX_BODY_BYTES:,} bytes",
                           code="request_too_large")
    try:
        body = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _required(body: dict, key: str):
    if key not in body or body[key] is None:
        raise ApiError(400, f"missing required field '{key}'", param=key, code="missing_field")
    return body[key]


def _served(served, body: dict):
    name = _required(body, "model")
    if not isinstance(name, str):
        raise ApiError(400, "'model' must be a string", param="model", code="invalid_type")
    if name not in served.entries:
        raise ApiError(404, f"The model `{name}` does not exist. Served: {', '.join(served.entries)}",
                       param="model", code="model_not_found")
    return served.entries[name]


def _messages(body: dict) -> list[dict]:
    messages = _required(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages", code="invalid_type")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"{where} needs a 'role' of {', '.join(ROLES)}", param=where, code="invalid_value")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts can be answered
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", param=where,
                               code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", param=where, code="invalid_type")
        out.append({"role": "system" if message["role"] == "developer" else message["role"], "content": content})
    return out


def _chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt as `tuneforge generate` builds it (evaluate/generation.chat_prompt); a template error is a 400."""
    from tuneforge.errors import TuneforgeError
    from tuneforge.evaluate.generation import chat_prompt

    try:
        return chat_prompt(tokenizer, messages, where="messages")
    except TuneforgeError as exc:
        raise ApiError(400, exc.message, param="messages", code="invalid_value") from None


def _prompts(body: dict) -> list[str]:
    prompt = _required(body, "prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings (token ids are not "
                       "supported)", param="prompt", code="invalid_type")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request",
                       param="prompt", code="invalid_value")
    if any(not p for p in prompts):
        raise ApiError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
    return prompts


def _options(body: dict) -> dict:
    """max_tokens, stop, stream and stream_options, checked; greedy only."""
    for key, allowed in UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise ApiError(400, f"'{key}' is not supported by tuneforge serve (greedy, one answer per prompt)",
                           param=key, code="unsupported_parameter")
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
                                    or temperature != 0):
        raise ApiError(400, "tuneforge serve answers greedily: 'temperature' must be 0 or left out (sampling: "
                       "serve with vLLM, see tuneforge serve --print-vllm)", param="temperature",
                       code="unsupported_parameter")
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ApiError(400, "'max_tokens' must be a whole number of at least 1", param="max_tokens",
                       code="invalid_value")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings", param="stop",
                       code="invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream", code="invalid_type")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    return {"max_tokens": max_tokens, "stop": stop, "stream": stream,
            "include_usage": bool(stream_options.get("include_usage"))}

