"""An OpenAI-compatible chat server for one model.  OpenAI 兼容的对话 API 服务。

    python scripts/serve_openai_api.py --weight full_sft                  # http://127.0.0.1:8998/v1
    python scripts/serve_openai_api.py --load_from out/full_sft_512-hf --host 0.0.0.0 --port 8000

Endpoints: ``POST /v1/chat/completions`` (``"stream": true`` gives server-sent events ending in ``data: [DONE]``)
and ``GET /v1/models``. Any OpenAI client works: see scripts/chat_openai_api.py. Each request is answered from its
own ``messages`` alone (no history is kept), one at a time (a lock: a small model on one device is fastest serially).
Bad requests get an OpenAI-style error (``{"error": {"message", "type", "param", "code"}}``) with a 4xx status.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from model.generation import ReplyStream, chat_prompt, generation_config
from model.loading import add_model_args, model_from_args


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]]  # a string, or OpenAI's content parts [{"type": "text", "text": ...}]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields we do not use (n, stop, user, ...) are accepted

    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # None (or absent): 0.85; 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)  # None: 0.85
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class RequireApiKey:
    """ASGI middleware: refuse requests without ``Authorization: Bearer <api_key>`` (401, OpenAI's error shape).

    Plain ASGI rather than ``@app.middleware``: that wrapper detaches streamed responses from the client connection,
    so a client hanging up would no longer stop its generation."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(sent, self.expected):
                response = error_response(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                          code="invalid_api_key")
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
    lock = asyncio.Lock()  # one generation at a time; waiting requests queue here
    context = model.config.max_position_embeddings
    created = int(time.time())

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
        return error_response(500, f"{type(e).__name__}: {e}")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minimind-lab"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await read_body(request, max_body_bytes))
        prompt = chat_prompt(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        requested = req.max_completion_tokens or req.max_tokens
        if requested and requested > max_tokens:
            raise ApiError(400, f"max_tokens is {requested}, this server allows at most {max_tokens}", "max_tokens")
        prompt_tokens = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        budget = requested or min(max_tokens, context - prompt_tokens)
        if budget < 1 or prompt_tokens + budget > context:
            raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({budget}) exceed the model's "
                                f"context of {context} tokens", "messages", "context_length_exceeded")
        temperature = 0.85 if req.temperature is None else req.temperature
        config = generation_config(tokenizer, budget, temperature, 0.85 if req.top_p is None else req.top_p)
        reply_id, name = f"chatcmpl-{uuid.uuid4().hex}", req.model or model_name

        def start() -> ReplyStream:
            if req.seed is not None:
                torch.manual_seed(req.seed)
            return ReplyStream(model, tokenizer, prompt, config)

        if not req.stream:
            def run() -> ReplyStream:
                stream = start()
                for _ in stream:
                    pass
                return stream

            async with lock:
                done = await run_in_threadpool(run)
            return {"id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                 "finish_reason": done.finish_reason}],
                    "usage": usage(done)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            async with lock:
                stream = start()
                pieces = iter(stream)
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    while (piece := await run_in_threadpool(next, pieces, None)) is not None:
                        yield chunk({"content": piece})
                    yield chunk({}, stream.finish_reason)
                    if include_usage:
                        body = {"id": reply_id, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": name, "choices": [], "usage": usage(stream)}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # also when the client hangs up mid-reply: stop generating before the next request
                    await run_in_threadpool(pieces.close)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


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

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (then set --api_key)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--model_name", default="minimind", help="the id /v1/models reports")
    p.add_argument("--max_tokens", type=int, default=2048, help="the largest max_tokens a request may ask for")
    p.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY"),
                   help="require this key from clients (default: $MINIMIND_API_KEY; none: anyone may ask)")
    args = p.parse_args()
    try:
        model, tokenizer = model_from_args(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{model.params_summary()} on {model.device}; serving http://{args.host}:{args.port}/v1", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without --api_key: anyone who can reach this port can use it", flush=True)
    app = create_app(model, tokenizer, args.model_name, args.max_tokens, api_key=args.api_key)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
