"""scripts/serve_openai_api.py as a real process, spoken to by the official openai client."""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from model.files import REPO_ROOT
from tests.test_eval_llm import needs_tokenizer, run, tiny_checkpoint

pytestmark = needs_tokenizer
API_KEY = "test-key"
api = httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"})  # what every request to the server sends
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """The server's --out_dir, with its checkpoint and its log."""
    out = tmp_path_factory.mktemp("out")
    tiny_checkpoint(out, max_position_embeddings=8192)  # room for a reply long enough to hang up on
    return out


@pytest.fixture(scope="module")
def server(out):
    port = free_port()
    log = open(out / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "scripts" / "serve_openai_api.py"), "--weight", "full_sft", "--hidden_size",
         "64", "--out_dir", str(out), "--port", str(port), "--max_tokens", "4000",
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


def test_the_server_names_the_checkpoint_it_serves(server, out):
    assert f"serving {out / 'full_sft_64.pth'} (Params: " in (out / "server.log").read_text()
    assert api.get(f"{server}/models").json()["data"][0]["root"] == "full_sft_64.pth"  # the name, not the path


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
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}',  # over the server's --max_tokens
    b'{"messages": [{"role": "user", "content": null}]}',  # null content is for an assistant's tool calls only
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": 99999999999999999999999}',  # over 64 bits
    b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}',
    b'{"messages": [{"role": "user", "content": "hi"}], "stop": "' + b"x" * 65 + b'"}',  # over 64 characters
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


@pytest.fixture(scope="module")
def app():
    """The app in-process around a tiny random model, without an API key (the default on 127.0.0.1)."""
    from model import MiniMindConfig, MiniMindForCausalLM
    from model.loading import load_tokenizer
    from scripts.serve_openai_api import create_app
    from tests.test_eval_llm import SHAPE

    return create_app(MiniMindForCausalLM(MiniMindConfig(**SHAPE)).eval(), load_tokenizer(), max_tokens=8)


def test_without_a_key_the_app_asks_for_none(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 200
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 4


def prompt_tokens(messages: list[dict], tools: list[dict] | None = None) -> int:
    """The length of the prompt the chat template makes of a request."""
    from model.loading import load_tokenizer

    tokenizer = load_tokenizer()
    prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(prompt, add_special_tokens=False).input_ids)


def test_tools_and_a_tool_call_history_reach_the_prompt(server):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key=API_KEY)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "assistant", "content": None, "tool_calls": [call]},  # as OpenAI agent loops send it
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"}]
    assert prompt_tokens(question, TOOLS) > prompt_tokens(question)
    for messages in (question, question + history):
        reply = client.chat.completions.create(model="minimind", messages=messages, tools=TOOLS, max_tokens=2)
        assert reply.usage.prompt_tokens == prompt_tokens(messages, TOOLS)
    # developer is OpenAI's newer name for system; content may come as text parts.
    developer = {"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}
    reply = client.chat.completions.create(model="minimind", messages=[developer] + question, max_tokens=2)
    assert reply.usage.prompt_tokens == prompt_tokens([{"role": "system", "content": "Be brief."}] + question)


def test_generated_tool_calls_are_parsed():
    from model.tools import split_tool_calls

    paris = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    broken = "<tool_call>\n{not json}\n</tool_call>"
    text, calls = split_tool_calls(f"Let me check.\n{paris}\n{broken}\n"
                                   '<tool_call>{"name": "now"}</tool_call> <tool_call>{"name": 7}</tool_call> <tool_call>')
    assert text == f"Let me check.\n\n{broken}\n" + ' <tool_call>{"name": 7}</tool_call> <tool_call>'
    assert [call["function"] for call in calls] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                                                    {"name": "now", "arguments": "{}"}]
    assert all(call["type"] == "function" and call["id"].startswith("call_") for call in calls)
    assert calls[0]["id"] != calls[1]["id"]
    assert split_tool_calls("no calls here") == ("no calls here", [])


def test_reply_text_never_sends_a_stop_string_or_a_tool_call():
    from scripts.serve_openai_api import ReplyText

    text = ReplyText(["STOP", "##"], tools=False)
    assert [text.feed(piece) for piece in ["Hello S", "x #", "a ST", "O"]] == ["Hello ", "Sx ", "#a ", ""]
    assert text.feed("P and more") == "" and text.stopped and text.text == "Hello Sx #a "
    assert text.finish() == ("", [])

    text = ReplyText([], tools=True)
    assert [text.feed(piece) for piece in ["Hi <to", 'ol_call>{"name": "now"}', "</tool_call>"]] == ["Hi ", "", ""]
    rest, calls = text.finish()
    assert rest == "" and [call["function"]["name"] for call in calls] == ["now"]

    # A call the model only thinks about is no call, and does not hold the stream back; one in the answer is.
    thought = '<think>\nI could call <tool_call>{"name": "f", "arguments": {}}</tool_call> here\n</think>\n\n'
    text = ReplyText([], tools=True)
    sent = "".join(text.feed(thought[i:i + 5]) for i in range(0, len(thought), 5))
    assert sent == thought  # nothing held back
    sent += "".join(text.feed(piece) for piece in ["Sure. ", '<tool_call>{"name": "g"}</tool_call>'])
    rest, calls = text.finish()
    assert sent + rest == thought + "Sure. " and [call["function"]["name"] for call in calls] == ["g"]


def scripted_reply(pieces: list[str], then_fail: str | None = None) -> type:
    """A ReplyStream that says ``pieces`` instead of asking the model (a tiny random model never calls a tool), and
    then raises RuntimeError(``then_fail``) if given."""
    from model.generation import ReplyStream

    class Scripted(ReplyStream):
        def __iter__(self):
            self.completion_tokens, self.text = len(pieces), "".join(pieces)
            yield from pieces
            if then_fail:
                raise RuntimeError(then_fail)

    return Scripted


def test_tool_calls_come_back_as_openai_tool_calls(app, monkeypatch):
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from scripts import serve_openai_api

    monkeypatch.setattr(serve_openai_api, "ReplyStream", scripted_reply([
        "Let me check.\n<tool", '_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}', "\n</tool_call>"]))
    with TestClient(app) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
        ask = dict(model="minimind", messages=[{"role": "user", "content": "Weather in Paris and Rome?"}], tools=TOOLS)
        choice = client.chat.completions.create(**ask).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
        assert [(call.type, call.function.name, json.loads(call.function.arguments))
                for call in choice.message.tool_calls] == [("function", "get_weather", {"city": "Paris"}),
                                                          ("function", "get_weather", {"city": "Rome"})]
        chunks = [chunk.choices[0] for chunk in client.chat.completions.create(**ask, stream=True)]
        assert "".join(c.delta.content or "" for c in chunks).strip() == "Let me check."
        streamed = [call for c in chunks for call in c.delta.tool_calls or []]
        assert [(call.index, call.function.name, call.function.arguments) for call in streamed] == [
            (i, call.function.name, call.function.arguments) for i, call in enumerate(choice.message.tool_calls)]
        assert chunks[-1].finish_reason == "tool_calls"
        # Without tools in the request the same text is plain content, as for any client that knows no tools.
        plain = client.chat.completions.create(model="minimind", messages=ask["messages"]).choices[0]
        assert plain.message.tool_calls is None and plain.message.content.count("<tool_call>") == 2


REPLIES = ["<think>\nParis is in France.\n</think>\n\nParis.", "Paris.", "<think>\n\n</think>\n\nHi", "<thinking aloud",
           "<think>\ncut off mid-thou", " <b>bold</b>\n", "\n<think>\nA </thin k>\n\n</think>B\n", ""]


@pytest.mark.parametrize("reply", REPLIES)
def test_a_streamed_reply_splits_into_reasoning_and_answer_as_the_whole(reply):
    from model.generation import ReasoningSplit, split_reasoning

    expected = split_reasoning(reply)
    for pieces in ([reply], list(reply), *([reply[:k], reply[k:]] for k in range(len(reply)))):
        split = ReasoningSplit()
        deltas = [split.feed(piece) for piece in pieces] + [split.feed("", done=True)]
        assert ("".join(r for r, _ in deltas), "".join(a for _, a in deltas)) == expected, pieces
    assert split_reasoning(REPLIES[0]) == ("Paris is in France.", "Paris.")
    assert split_reasoning(REPLIES[3]) == ("", REPLIES[3]) and split_reasoning(REPLIES[4]) == ("cut off mid-thou", "")


def test_reasoning_comes_back_as_reasoning_content(app, monkeypatch, capsys):
    from argparse import Namespace

    from fastapi.testclient import TestClient
    from openai import OpenAI

    from scripts import serve_openai_api
    from scripts.chat_openai_api import reply

    monkeypatch.setattr(serve_openai_api, "ReplyStream", scripted_reply(
        ["<think>", "\nParis is the capital", " of France.\n</th", "ink>\n\n", "Paris."]))
    with TestClient(app) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
        ask = dict(model="minimind", messages=[{"role": "user", "content": "Capital of France?"}])
        message = client.chat.completions.create(**ask).choices[0].message
        assert (message.reasoning_content, message.content) == ("Paris is the capital of France.", "Paris.")
        chunks = [chunk.choices[0].delta for chunk in client.chat.completions.create(**ask, stream=True)]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in chunks) == message.reasoning_content
        assert "".join(d.content or "" for d in chunks) == "Paris."
        capsys.readouterr()
        answer = reply(client, Namespace(model="minimind", temperature=0.85, max_tokens=8), ask["messages"])["content"]
        assert answer == "Paris."  # what goes into the history: the thinking stays out
        assert capsys.readouterr().out == "🤖: (thinking) Paris is the capital of France.\nParis.\n"


def test_stop_strings_end_the_reply_before_them(server):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key=API_KEY)
    ask = dict(model="minimind", messages=[{"role": "user", "content": "天空为什么是蓝色的"}], temperature=0,
               max_tokens=30)
    full = client.chat.completions.create(**ask).choices[0].message.content
    stop = full[8:11]  # greedy: the same reply again, up to its first stop string
    expected = full[:full.index(stop)]
    reply = client.chat.completions.create(**ask, stop=[stop, "never said 从未说过"])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 30
    chunks = [chunk.choices[0] for chunk in client.chat.completions.create(**ask, stop=stop, stream=True)]
    assert "".join(c.delta.content or "" for c in chunks) == expected and chunks[-1].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_the_server(server, stream):
    from openai import APITimeoutError, OpenAI

    impatient = OpenAI(base_url=server, api_key=API_KEY, max_retries=0, timeout=1)
    long = dict(model="minimind", messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=4000)
    if stream:
        with impatient.chat.completions.create(**long, stream=True) as chunks:
            next(iter(chunks))  # then hang up
    else:
        with pytest.raises(APITimeoutError):  # a 4000-token reply takes several seconds
            impatient.chat.completions.create(**long)
    start = time.perf_counter()
    short = api.post(f"{server}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 3}, timeout=60)
    assert short.status_code == 200 and time.perf_counter() - start < 3


def test_the_chat_client_prints_errors_and_goes_on(server):
    chat = str(REPO_ROOT / "scripts" / "chat_openai_api.py")
    refused = run(chat, "--base_url", server, "--api_key", API_KEY, "--max_tokens", "100000", stdin="hi\nhello\n")
    assert refused.returncode == 0 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stdout.count("error: Error code: 400") == 2
    ok = run(chat, "--base_url", server, "--api_key", API_KEY, "--max_tokens", "3", "--history_cnt", "2",
             stdin="hi\n/clear\nhello\n")
    assert ok.returncode == 0 and "error" not in ok.stdout and ok.stdout.count("🤖: ") == 2
    assert ok.stdout.startswith("👶: hi\n🤖: ") and "\n(history cleared / 历史已清空)\n👶: hello\n🤖: " in ok.stdout
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    down = run(chat, "--base_url", nobody, stdin="hi\n")
    assert down.returncode == 0 and "error: Connection error." in down.stdout, down.stderr
    assert f"Nothing answered at {nobody}/" in down.stdout  # the URL it tried
    assert run(chat, "--history_cnt", "3").returncode == 2


def test_stop_strings_are_prepared_before_waiting_for_the_generation_lock(app, monkeypatch):
    from fastapi.testclient import TestClient

    import model.generation
    from scripts.serve_openai_api import MAX_STOP_CHARS, MAX_STOPS

    built = []

    class Recording(model.generation.StopStringCriteria):  # transformers' tables: seconds for long stop strings
        def __init__(self, tokenizer, stops):
            built.append((list(stops), app.state.generation_lock.locked()))
            super().__init__(tokenizer, stops)

    monkeypatch.setattr(model.generation, "StopStringCriteria", Recording)
    stops = [f"{i}" * MAX_STOP_CHARS for i in range(MAX_STOPS)]  # as many and as long as allowed
    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 4, "stop": stops})
    assert reply.status_code == 200
    assert built == [(stops, False)], "the stop strings were not prepared before taking the lock"


def test_a_tiny_temperature_is_greedy(app):
    from fastapi.testclient import TestClient

    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    with TestClient(app) as client:
        replies = [client.post("/v1/chat/completions", json={**ask, "temperature": t}) for t in (0, 1e-45, 1e-6)]
    assert [r.status_code for r in replies] == [200] * 3, replies[1].text
    assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1


SECRET = "internal detail /home/secret/path"


def test_a_failed_reply_is_a_500_without_internal_text_and_is_logged(app, monkeypatch, caplog):
    from fastapi.testclient import TestClient

    from scripts import serve_openai_api

    monkeypatch.setattr(serve_openai_api, "ReplyStream", scripted_reply(["Hel", "lo"], then_fail=SECRET))
    with TestClient(app, raise_server_exceptions=False) as client:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 500 and SECRET not in reply.text
    assert reply.json()["error"] == {"message": serve_openai_api.INTERNAL_ERROR, "type": "server_error",
                                     "param": None, "code": None}
    assert SECRET in caplog.text  # the server's log has what went wrong


def test_a_stream_that_fails_ends_with_an_error_event_and_done(app, monkeypatch, caplog):
    from fastapi.testclient import TestClient

    from scripts import serve_openai_api

    monkeypatch.setattr(serve_openai_api, "ReplyStream", scripted_reply(["Hel", "lo"], then_fail=SECRET))
    with TestClient(app) as client:
        body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "stream": True}).text
    events = [line.removeprefix("data: ") for line in body.split("\n") if line]
    assert events[-1] == "[DONE]" and SECRET not in body
    assert json.loads(events[-2])["error"]["message"] == serve_openai_api.INTERNAL_ERROR
    assert "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "Hello"
    assert SECRET in caplog.text and "Traceback" in caplog.text


def test_a_prompt_longer_than_the_context_is_named_in_tokens(app):
    from fastapi.testclient import TestClient

    from scripts.serve_openai_api import ApiError, reply_budget

    messages = [{"role": "user", "content": "天空为什么是蓝色的" * 200}]  # over the 512 tokens of SHAPE's context
    with TestClient(app) as client:
        error = client.post("/v1/chat/completions", json={"messages": messages}).json()["error"]
    assert error["message"] == f"the prompt is {prompt_tokens(messages)} tokens and the model's context 512: no room " \
                               "is left for a reply (shorten the messages)"
    with pytest.raises(ApiError, match=r"the prompt \(500 tokens\) plus max_tokens \(20\) exceed the model's "
                                       r"context of 512 tokens: ask for at most 12"):
        reply_budget(500, 20, max_tokens=2048, context=512)
    assert reply_budget(500, None, max_tokens=2048, context=512) == 12 == reply_budget(500, 12, 2048, 512)
    assert reply_budget(10, None, max_tokens=8, context=512) == 8
