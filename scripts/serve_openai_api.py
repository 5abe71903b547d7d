"""An OpenAI-compatible chat server for one model.  OpenAI 兼容的对话 API 服务。

    python scripts/serve_openai_api.py --weight full_sft                  # http://127.0.0.1:8998/v1
    python scripts/serve_openai_api.py --load_from out/full_sft_512-hf --host 0.0.0.0 --port 8000

Endpoints: ``POST /v1/chat/completions`` (``"stream": true`` gives server-sent events ending in ``data: [DONE]``)
and ``GET /v1/models``. Any OpenAI client works: see scripts/chat_openai_api.py. Each request is answered from its
own ``messages`` alone (no history is kept), one at a time (a lock: a small model on one device is fastest serially).
Bad requests get an OpenAI-style error (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status.

``GET /`` is a chat page (scripts/web/: static files, public even with ``--api_key``; its API calls send the key),
which reads the model's parameter count and the largest ``max_tokens`` from ``/v1/models``.

``tools`` go into the prompt through the chat template; when the request has them, the reply's parseable
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks come back as ``tool_calls`` (finish_reason
``"tool_calls"``). ``stop`` strings (up to 4, each up to 64 characters) end a reply before them. A temperature below
1e-5 means greedy, as 0 does. A client that hangs up stops its generation. A reply that fails midway ends its stream
with an error event and ``data: [DONE]``; the client learns only that the server failed, its log the details.

A reply that opens with ``<think>…</think>`` (a model trained on reasoning_content, which the chat template renders
so) comes back split, as DeepSeek's API does: the thinking as ``reasoning_content``, the answer as ``content``.
``"chat_template_kwargs": {"open_thinking": true}`` (vLLM's spelling; ``enable_thinking`` and top-level
``open_thinking`` / ``enable_thinking`` work too) makes the prompt open the thinking, ``false`` closes it empty so the
model answers directly; unset, the template decides (ours leaves it to the model, minimind-3's closes it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.concurrency import run_in_threadpool

from model.cli import HelpFormatter
from model.generation import (ReasoningSplit, ReplyStream, answer_start, chat_prompt, generation_config,
                              opens_thinking, partial_marker, split_reasoning)
from model.loading import add_model_args, lora_arg, model_from_args
from model.tools import TOOL_CALL_START, assistant_turn, split_tool_calls

# Stop strings as OpenAI bounds them (up to 4), and short: real ones are markers ("\n\n", "User:", "</answer>"), while
# transformers builds tables for each from the whole vocabulary, in time and memory that grow with the length: 4 x 64
# characters took 0.6-0.8 s and at most ~7 MB here (it caches 8 such sets); one 20,000-character string took 35 s.
MAX_STOPS, MAX_STOP_CHARS = 4, 64
THINKING_SWITCHES = ("open_thinking", "enable_thinking")  # MiniMind's name first, then Qwen3's / vLLM's
INTERNAL_ERROR = "the server failed to answer this request (the details are in its log)"
WEB_DIR = Path(__file__).resolve().parent / "web"  # the chat page served at / (static files, no build step)
# The page may only load its own files and talk to its own server: even a renderer bug could run no injected script.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff"}

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: its format, its --log-level


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends a JSON string


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None  # a string, or OpenAI's content parts [{"type": "text", ...}]
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (its content is then often null)
    tool_call_id: str | None = None  # a tool's answer names the call it answers
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")

    def for_template(self) -> dict[str, Any]:
        """The message as model/chat_template.jinja reads it; ``developer`` is OpenAI's newer name for ``system``."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        return message


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (user, tool_choice, ...) are accepted

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI's [{"type": "function", "function": {...}}], shown as given
    temperature: float | None = Field(None, ge=0, le=2)  # None (or absent): 0.85; 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)  # None: 0.85
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stop: str | list[str] | None = Field(default_factory=list)  # a string or up to 4; a list once validated
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)  # what torch.manual_seed accepts
    # The thinking switch, as servers spell it: chat_template_kwargs (vLLM, SGLang) or top level (MiniMind, Qwen's API)
    chat_template_kwargs: dict[str, Any] | None = None  # only open_thinking / enable_thinking are read
    open_thinking: bool | None = None
    enable_thinking: bool | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _thinking_switches(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in THINKING_SWITCHES:
            if key in (kwargs or {}) and not isinstance(kwargs[key], bool | None):
                raise ValueError(f"{key} must be true or false, not {json.dumps(kwargs[key])}")
        return kwargs

    def thinking(self) -> bool | None:
        """True: the prompt opens the thinking; False: it closes it empty; None: as the chat template decides."""
        kwargs = self.chat_template_kwargs or {}
        switches = [kwargs.get(key) for key in THINKING_SWITCHES] + [self.open_thinking, self.enable_thinking]
        return next((switch for switch in switches if switch is not None), None)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or "" in stops:
            raise ValueError(f"stop takes a string or a list of up to {MAX_STOPS} strings, none of them empty")
        if longest := max((s for s in stops if len(s) > MAX_STOP_CHARS), key=len, default=None):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters, not {len(longest)}")
        return stops


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


class ReplyText:
    """A reply's text checked as it arrives: cut before the first stop string and, when the request has tools, held
    back from the first ``<tool_call>`` of the answer on (not of a leading ``<think>`` block: a call the model only
    thinks about is no call), to be parsed when the reply ends. ``feed`` returns what is safe to send.
    ``thinking_open``: the prompt opened the think block, so the reply starts inside it."""

    def __init__(self, stops: list[str], tools: bool, thinking_open: bool = False):
        self.stops, self.tools, self.thinking_open = stops, tools, thinking_open
        self.markers = (stops + [TOOL_CALL_START]) if tools else stops
        self.text, self.sent, self.stopped = "", 0, False

    def feed(self, piece: str) -> str:
        # Only a stop string that ends in the new piece can be new: the text before it held none.
        scan_from = max(0, len(self.text) - max(map(len, self.stops), default=0) + 1)
        self.text += piece
        hits = [i for stop in self.stops if (i := self.text.find(stop, scan_from)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        # Hold back an end that may grow into a stop string or a <tool_call> with the next piece.
        end = len(self.text) if self.stopped else len(self.text) - partial_marker(self.text, self.markers)
        answer = answer_start(self.text, done=False, thinking_open=self.thinking_open)
        if self.tools and answer is not None and (call := self.text.find(TOOL_CALL_START, max(self.sent, answer))) >= 0:
            end = min(end, call)
        safe = self.text[self.sent:max(end, self.sent)]
        self.sent += len(safe)
        return safe

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The text not sent yet, less the answer's parseable tool calls, and those calls in OpenAI's shape."""
        rest, self.sent = self.text[self.sent:], len(self.text)
        answer = answer_start(self.text, thinking_open=self.thinking_open)
        if not self.tools or answer is None:
            return rest, []
        thinking = max(0, answer - (len(self.text) - len(rest)))  # the part of rest still inside the think block
        kept, calls = split_tool_calls(rest[thinking:])
        return rest[:thinking] + kept, calls


class RequireApiKey:
    """ASGI middleware: refuse requests without ``Authorization: Bearer <api_key>`` (401, OpenAI's error shape).

    Plain ASGI rather than ``@app.middleware``: that wrapper detaches streamed responses from the client connection,
    so a client hanging up would no longer stop its generation. The chat page (``/`` and ``/web/``) is public static
    content: it asks the user for the key and sends it with its API calls."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not (scope["path"] == "/" or scope["path"].startswith("/web/")):
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(sent, self.expected):
                response = error_response(401, "missing or wrong API key: send the header "
                                               "'Authorization: Bearer <key>'", code="invalid_api_key")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(model, tokenizer, model_name: str = "minimind", max_tokens: int = 2048,
               max_body_bytes: int = 1_000_000, api_key: str | None = None) -> FastAPI:
    """The app around a loaded model. ``max_tokens`` caps a reply, and prompt + reply must fit the model's context.
    With ``api_key`` every request must send ``Authorization: Bearer <api_key>`` (what OpenAI clients send)."""
    app = FastAPI(title="minimind-lab OpenAI-compatible API")
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)
    lock = app.state.generation_lock = asyncio.Lock()  # one generation at a time; waiting requests queue here
    created = int(time.time())
    total, active = model.count_parameters()
    listing = {"id": model_name, "object": "model", "created": created, "owned_by": "minimind-lab",
               "parameters": total, "active_parameters": active, "max_tokens": max_tokens}
    if model.name_or_path:  # the file's name only: where it lies on the server is no client's business
        listing["root"] = Path(model.name_or_path).name

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(404)
    async def _not_found(request: Request, e: Exception) -> JSONResponse:
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def _bad_method(request: Request, e: Exception) -> JSONResponse:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        # The client learns only that it failed; the server (uvicorn) logs the traceback after this handler.
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return error_response(500, INTERNAL_ERROR)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [listing]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await read_body(request, max_body_bytes))
        # Tokenizing a long prompt and building stop-string tables take a while: in a worker thread, before the lock.
        job = await run_in_threadpool(prepare, req, model, tokenizer, max_tokens, model_name)
        if req.stream:
            return StreamingResponse(events(job, lock), media_type="text/event-stream")
        return await complete(job, lock, request) or Response(status_code=499)  # nobody reads a 499

    return app


class Job:
    """A checked request, ready to generate: its prompt tokenized, its stop strings prepared (``ReplyStream``)."""

    def __init__(self, req: ChatRequest, stream: ReplyStream, model_name: str, thinking_open: bool):
        self.req, self.stream, self.model_name = req, stream, req.model or model_name
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.thinking_open = thinking_open  # the prompt opened the think block: the reply starts inside it
        self.text = ReplyText(req.stop, bool(req.tools), thinking_open)


def prepare(req: ChatRequest, model, tokenizer, max_tokens: int, model_name: str) -> Job:
    """The generation ``req`` asks for, refused (ApiError) when it asks for too much."""
    if req.n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    requested = req.max_completion_tokens or req.max_tokens
    if requested and requested > max_tokens:
        raise ApiError(400, f"max_tokens is {requested}, this server allows at most {max_tokens}", "max_tokens")
    prompt = chat_prompt(tokenizer, [m.for_template() for m in req.messages], req.tools or None, req.thinking())
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    budget = reply_budget(prompt_tokens, requested, max_tokens, model.config.max_position_embeddings)
    temperature = 0.85 if req.temperature is None else req.temperature
    config = generation_config(tokenizer, budget, temperature, 0.85 if req.top_p is None else req.top_p)
    config.stop_strings = req.stop or None  # generation ends at a stop string; ReplyText cuts the text before it
    return Job(req, ReplyStream(model, tokenizer, prompt, config), model_name, opens_thinking(prompt))


def reply_budget(prompt_tokens: int, requested: int | None, max_tokens: int, context: int) -> int:
    """The tokens a reply may take: ``requested`` (max_tokens), else as many as the server and the context allow."""
    room = context - prompt_tokens
    if room < 1:
        message = (f"the prompt is {prompt_tokens} tokens and the model's context {context}: no room is left for a "
                   "reply (shorten the messages)")
    elif requested and requested > room:
        message = (f"the prompt ({prompt_tokens} tokens) plus max_tokens ({requested}) exceed the model's context of "
                   f"{context} tokens: ask for at most {room}")
    else:
        return requested or min(max_tokens, room)
    raise ApiError(400, message, "messages", "context_length_exceeded")


def seed(job: Job) -> None:
    """Under the lock, right before generating: torch's generator is shared by all requests."""
    if job.req.seed is not None:
        torch.manual_seed(job.req.seed)


def finish_reason(job: Job, calls: list[dict[str, Any]]) -> str:
    return "tool_calls" if calls else "stop" if job.text.stopped else job.stream.finish_reason


async def complete(job: Job, lock: asyncio.Lock, request: Request) -> dict[str, Any] | None:
    """The whole reply as one chat.completion; None when the client hung up (generation then stops)."""
    async with lock:
        seed(job)
        sent: list[str] = []
        async with aclosing(safe_text(job.stream, job.text)) as pieces:
            async for piece in pieces:
                if await request.is_disconnected():
                    return None
                sent.append(piece)
    rest, calls = job.text.finish()
    reasoning, answer = split_reasoning("".join(sent) + rest, thinking_open=job.thinking_open)
    message = assistant_turn(answer, calls)
    if reasoning:
        message["reasoning_content"] = reasoning
    return {"id": job.id, "object": "chat.completion", "created": int(time.time()), "model": job.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(job, calls)}],
            "usage": usage(job.stream)}


def event(body: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def chunk(job: Job, delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> str:
    """A chat.completion.chunk event: a ``delta`` of the reply (None: no choice, as in the closing usage chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return event({"id": job.id, "object": "chat.completion.chunk", "created": int(time.time()), "model": job.model_name,
                  "choices": choices, **extra})


def deltas(job: Job, reasoning: str, answer: str) -> Iterator[str]:
    if reasoning:
        yield chunk(job, {"reasoning_content": reasoning})
    if answer:
        yield chunk(job, {"content": answer})


async def events(job: Job, lock: asyncio.Lock) -> AsyncIterator[str]:
    """The reply as server-sent events, always ending in ``data: [DONE]``: after an error event if generation failed
    (the status line, 200, was sent before)."""
    try:
        async with lock:
            seed(job)
            split = ReasoningSplit(job.thinking_open)
            async with aclosing(safe_text(job.stream, job.text)) as pieces:
                yield chunk(job, {"role": "assistant", "content": ""})
                async for piece in pieces:
                    for text in deltas(job, *split.feed(piece)):
                        yield text
            rest, calls = job.text.finish()
            reasoning, answer = split.feed(rest, done=True)
            if calls and not answer.strip():  # the whitespace around tool calls is no content
                answer = ""
            for text in deltas(job, reasoning, answer):
                yield text
            if calls:
                yield chunk(job, {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
            yield chunk(job, {}, finish_reason(job, calls))
            if job.req.stream_options and job.req.stream_options.include_usage:
                yield chunk(job, None, usage=usage(job.stream))
    except Exception:  # not a hang-up (that cancels): the client gets an error event, the log the traceback
        log.exception("streamed reply %s failed", job.id)
        yield event(error_body(500, INTERNAL_ERROR))
    yield "data: [DONE]\n\n"


async def safe_text(stream: ReplyStream, text: ReplyText) -> AsyncIterator[str]:
    """Generate in a worker thread and yield, for each piece, the text now safe to send (often ""). Generation ends
    at a stop string, or when this iterator is closed: also when the client hangs up mid-reply."""
    pieces = iter(stream)
    try:
        while not text.stopped and (piece := await run_in_threadpool(next, pieces, None)) is not None:
            yield text.feed(piece)
    finally:
        with anyio.CancelScope(shield=True):  # a hang-up cancels the request: stop generating even so
            await run_in_threadpool(pieces.close)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (before all of it is read)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    return bytes(body)


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param) from None


def usage(stream: ReplyStream) -> dict[str, int]:
    return {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
            "total_tokens": stream.prompt_tokens + stream.completion_tokens}


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (then set --api_key)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--model_name", default="minimind", help="the id /v1/models reports")
    p.add_argument("--max_tokens", type=int, default=2048, help="the largest max_tokens a request may ask for")
    p.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY"),
                   help="require this key from clients (default: $MINIMIND_API_KEY; none: anyone may ask)")
    p.add_argument("--open_browser", action="store_true", help="open the chat page in a browser once serving")
    args = p.parse_args()
    try:
        model, tokenizer = model_from_args(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    lora = f" + LoRA {lora_arg(args)}" if lora_arg(args) else ""
    print(f"serving {model.name_or_path}{lora} ({model.params_summary()} on {model.device}) at "
          f"http://{args.host}:{args.port}/v1", flush=True)
    local = "localhost" if args.host in ("0.0.0.0", "::") else f"[{args.host}]" if ":" in args.host else args.host
    page = f"http://{local}:{args.port}/"
    print(f"chat page: {page}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api_key: anyone who can reach this port can use it",
              flush=True)
    app = create_app(model, tokenizer, args.model_name, args.max_tokens, api_key=args.api_key)
    if args.open_browser:
        open_when_up(page)
    uvicorn.run(app, host=args.host, port=args.port)


def open_when_up(url: str, wait_s: float = 60) -> None:
    """Open ``url`` in the user's browser (``$BROWSER`` if set) as soon as the server answers there."""
    import threading
    import urllib.request
    import webbrowser

    def wait_then_open() -> None:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                webbrowser.open(url)
                return
            except OSError:
                time.sleep(0.2)
        print(f"warning: {url} did not answer within {wait_s:.0f} s; no browser opened", flush=True)

    threading.Thread(target=wait_then_open, daemon=True).start()


if __name__ == "__main__":
    main()
