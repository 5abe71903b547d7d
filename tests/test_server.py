"""scripts/serve_openai_api.py as a real process, spoken to by the official openai client."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from model.loading import REPO_ROOT
from tests.test_eval_llm import needs_tokenizer, tiny_checkpoint

pytestmark = needs_tokenizer
API_KEY = "test-key"
api = httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"})  # what every request to the server sends


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    tiny_checkpoint(out)
    port = free_port()
    log = open(out / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "scripts" / "serve_openai_api.py"), "--weight", "full_sft", "--hidden_size",
         "64", "--out_dir", str(out), "--port", str(port), "--max_tokens", "64",
         "--api_key", API_KEY],
        stdout=log, stderr=subprocess.STDOUT, cwd=out, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, (out / "server.log").read_text()
            try:
                httpx.get(f"{url}/models", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline, "server did not start: " + (out / "server.log").read_text()
                time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_openai_client_streamed_equals_non_streamed(server):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key=API_KEY)
    assert [m.id for m in client.models.list().data] == ["minimind"]
    messages = [{"role": "user", "content": "天空为什么是蓝色的"}]
    reply = client.chat.completions.create(model="minimind", messages=messages, temperature=0, max_tokens=20)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens <= 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")

    stream = client.chat.completions.create(model="minimind", messages=messages, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_raw_stream_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5, "temperature": 0}
    lines = [line for line in api.post(f"{server}/chat/completions", json=body, timeout=60).text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize("body", [
    b"not json",
    b"{}",  # no messages
    b'{"messages": "hello"}',  # wrong type
    b'{"messages": []}',
    b'{"messages": [{"role": "wizard", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}',  # over the server's --max_tokens 64
    b'{"messages": [{"role": "user", "content": "' + b"x" * 1_100_000 + b'"}]}',  # over the 1 MB body limit
])
def test_bad_requests_get_4xx_openai_errors_and_the_server_keeps_serving(server, body):
    response = api.post(f"{server}/chat/completions", content=body, headers={"content-type": "application/json"},
                          timeout=60)
    assert 400 <= response.status_code < 500
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    ok = api.post(f"{server}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 3


def test_prompt_longer_than_the_context_is_refused(server):
    long = "天空为什么是蓝色的" * 8000  # > 32768 tokens (a .pth carries no max_position_embeddings: MiniMind's)
    response = api.post(f"{server}/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": long}], "max_tokens": 10})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_requests_share_no_history(server):
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 10, "temperature": 0}
    first = api.post(f"{server}/chat/completions", json=body, timeout=60).json()
    other = {"messages": [{"role": "user", "content": "something else entirely"}], "max_tokens": 10}
    api.post(f"{server}/chat/completions", json=other, timeout=60)
    again = api.post(f"{server}/chat/completions", json=body, timeout=60).json()
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    assert again["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]


def test_requests_without_the_api_key_are_refused(server):
    from openai import AuthenticationError, OpenAI

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{server}/models", headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    streamed = httpx.post(f"{server}/chat/completions", timeout=10,
                          json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert streamed.status_code == 401
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server, api_key="wrong", max_retries=0).chat.completions.create(
            model="minimind", messages=[{"role": "user", "content": "hi"}])


def test_without_a_key_the_app_asks_for_none():
    """The keyless app (the default on 127.0.0.1), in-process: no Authorization header needed."""
    from fastapi.testclient import TestClient

    from model import MiniMindConfig, MiniMindForCausalLM
    from model.loading import load_tokenizer
    from scripts.serve_openai_api import create_app
    from tests.test_eval_llm import SHAPE

    app = create_app(MiniMindForCausalLM(MiniMindConfig(**SHAPE)).eval(), load_tokenizer(), max_tokens=8)
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 200
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4
