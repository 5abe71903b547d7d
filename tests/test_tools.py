"""model/tools.py: the tools, how calls are read, and the tool loop driven by a scripted model."""

import json
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from model.loading import load_tokenizer
from model.tools import (TOOLS, Tool, Toolbox, assistant_turn, calculate_math, malformed_tool_calls, split_tool_calls,
                         tool_loop)
from tests.test_eval_llm import needs_tokenizer

CLOCK = datetime(2026, 3, 14, 15, 9, 26, tzinfo=timezone.utc)


@pytest.fixture
def toolbox():
    return Toolbox(clock=lambda: CLOCK)


@pytest.mark.parametrize("expression, result", [
    ("256*37", 9472), ("2^10 + sqrt(144)", 1036), ("（1 + 2）× 3 ÷ 4", 2.25), ("0.1 + 0.2", 0.3), ("7 // 2", 3),
    ("-2**2", -4), ("round(pi, 2)", 3.14), ("log(8, 2)", 3), ("abs(-5) % 3", 2),
])
def test_the_calculator_computes(expression, result):
    assert calculate_math(expression)["result"] == result


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('ls')", "is not allowed"), ("open('x')", "is not allowed"), ("a + 1", "is not allowed"),
    ("(1).__class__", "is not allowed"), ("'a' * 3", "is not allowed"), ("[x for x in (1, 2)]", "is not allowed"),
    ("True + 1", "is not allowed"), ("sqrt(x=4)", "is not allowed"), ("9**9**9", "exponents are limited"),
    ("10**99 * 10**99", "too large"), ("exp(1000)", "cannot compute"), ("1/0", "cannot compute"),
    ("sqrt(-1)", "cannot compute"), ("(-8)**0.5", "not a real number"), ("floor(1, 2)", "cannot compute"),
    ("1 +", "not an arithmetic expression"), ("1+" * 60 + "1", "more than 100 parts"), ("1" * 201, "longer than 200"),
])
def test_the_calculator_refuses_what_is_not_bounded_arithmetic(toolbox, expression, error):
    assert error in toolbox.call("calculate_math", {"expression": expression})["error"]


def test_unit_conversions_know_names_in_both_languages(toolbox):
    def convert(value, source, target):
        return toolbox.call("unit_converter", {"value": value, "from_unit": source, "to_unit": target})

    assert convert(100, "公里", "miles")["result"] == 62.1371
    assert convert(30, "°C", "Fahrenheit")["result"] == 86 and convert(212, "f", "kelvin")["result"] == 373.15
    assert convert(2, "斤", "kg")["result"] == 1 and convert(90, "minutes", "h")["result"] == 1.5
    assert "cannot convert mass (kg) to length (km)" in convert(3, "kg", "km")["error"]
    assert "unknown unit 'parsec'" in convert(3, "parsec", "km")["error"]


def test_time_comes_from_the_toolbox_clock(toolbox):
    assert toolbox.call("get_current_time", {}) == {"timezone": "Asia/Shanghai", "datetime": "2026-03-14 23:09:26",
                                                    "weekday": "Saturday"}
    assert toolbox.call("get_current_time", {"timezone": "America/New_York"})["datetime"] == "2026-03-14 11:09:26"
    assert "unknown time zone 'Mars/Base'" in toolbox.call("get_current_time", {"timezone": "Mars/Base"})["error"]
    assert toolbox.call("days_between", {"start_date": "2024-02-01", "end_date": "2024-03-01"})["days"] == 29
    assert "YYYY-MM-DD" in toolbox.call("days_between", {"start_date": "1 May", "end_date": "2024-03-01"})["error"]


def test_lookups_take_either_language_and_say_what_they_know(toolbox):
    assert toolbox.call("get_capital", {"country": "法国"})["capital"] == "Paris"
    assert toolbox.call("get_capital", {"country": " usa "})["capital"] == "Washington, D.C."
    assert "known countries: China" in toolbox.call("get_capital", {"country": "Atlantis"})["error"]
    for name in ("Fe", "iron", "铁", "26"):
        assert toolbox.call("get_element_info", {"element": name})["atomic_number"] == 26
    assert "unknown element 'Xx'" in toolbox.call("get_element_info", {"element": "Xx"})["error"]


@pytest.mark.parametrize("name, arguments, error", [
    ("get_weather", {"city": "Paris"}, "unknown tool 'get_weather'; the tools are calculate_math"),
    ("get_capital", "{not json", "the arguments of get_capital are not valid JSON"),
    ("get_capital", "[1, 2]", "the arguments of get_capital must be a JSON object"),
    ("get_capital", {}, "get_capital needs the argument 'country'"),
    ("get_capital", {"country": "France", "lang": "en"}, "get_capital has no argument 'lang'; it takes country"),
    ("unit_converter", {"value": "30", "from_unit": "c", "to_unit": "f"}, "'value' must be a number, got \"30\""),
    ("unit_converter", {"value": True, "from_unit": "c", "to_unit": "f"}, "'value' must be a number, got true"),
])
def test_bad_calls_become_errors_the_model_reads(toolbox, name, arguments, error):
    assert error in toolbox.call(name, arguments)["error"]


def test_a_tool_not_offered_is_unknown_and_a_bug_in_a_tool_is_an_error_not_a_crash(monkeypatch):
    toolbox = Toolbox(["get_capital"])
    assert "unknown tool 'calculate_math'; the tools are get_capital" in toolbox.call(
        "calculate_math", {"expression": "1"})["error"]
    broken = Tool(lambda country: 1 / 0, "", toolbox.tools["get_capital"].parameters)
    monkeypatch.setitem(toolbox.tools, "get_capital", broken)
    assert toolbox.call("get_capital", {"country": "x"}) == {"error": "get_capital failed: ZeroDivisionError: "
                                                                      "division by zero"}
    with pytest.raises(ValueError, match="unknown tool nope; the tools are calculate_math"):
        Toolbox(["nope"])


def test_every_schema_is_an_openai_function_whose_parameters_match_the_function():
    import inspect

    for tool in TOOLS:
        schema = tool.schema()
        assert schema["type"] == "function" and schema["function"]["name"] == tool.name
        parameters = schema["function"]["parameters"]
        assert parameters["type"] == "object" and set(parameters["required"]) <= set(parameters["properties"])
        signature = inspect.signature(tool.function).parameters
        assert set(parameters["properties"]) == set(signature) - {"now"}
        assert all(signature[name].default is inspect.Parameter.empty for name in parameters["required"])


def test_calls_are_read_and_what_is_not_a_call_is_named():
    text = ('Sure.\n<tool_call>\n{"name": "get_capital", "arguments": {"country": "France"}}\n</tool_call>\n'
            '<tool_call>{"name": "calc", "arguments": {"x": 1}</tool_call><tool_call>{"arguments": {}}</tool_call>'
            '<tool_call>{"name": "f", "arguments": 3}</tool_call> <tool_call>{"name": "g"')
    kept, calls = split_tool_calls(text)
    assert [call["function"] for call in calls] == [{"name": "get_capital", "arguments": '{"country": "France"}'}]
    errors = malformed_tool_calls(kept)
    assert len(errors) == 4 and "not valid JSON" in errors[0] and 'must hold {"name"' in errors[1]
    assert "the arguments of f must be a JSON object, got 3" in errors[2] and "without </tool_call>" in errors[3]
    assert malformed_tool_calls("no calls at all") == []
    assert assistant_turn(*split_tool_calls('  <tool_call>{"name": "g"}</tool_call>\n'))["content"] is None


def scripted(replies: list[str], prompts: list[list[dict]]):
    """A model that says ``replies`` in turn (as eval_llm turns a reply into a message), recording what it was sent."""
    replies = iter(replies)

    def ask(messages):
        prompts.append([dict(m) for m in messages])
        return assistant_turn(*split_tool_calls(next(replies)))

    return ask


def test_the_loop_runs_valid_calls_and_answers_malformed_and_unknown_ones_with_errors(toolbox):
    prompts: list[list[dict]] = []
    ask = scripted([
        '<tool_call>{"name": "calculate_math", "arguments": {"expression": "256*37"}}</tool_call>',
        '<tool_call>{"name": "calculate_math", "arguments": {"expression": </tool_call>',  # malformed JSON
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',  # unknown tool
        "256 × 37 = 9472.",
    ], prompts)
    question = [{"role": "user", "content": "256*37?"}]
    new = list(tool_loop(ask, question, toolbox, max_rounds=3))
    assert [m["role"] for m in new] == ["assistant", "tool"] * 3 + ["assistant"]
    assert json.loads(new[1]["content"]) == {"expression": "256*37", "result": 9472}
    assert new[1]["tool_call_id"] == new[0]["tool_calls"][0]["id"]
    assert "not valid JSON" in json.loads(new[3]["content"])["error"] and "tool_call_id" not in new[3]
    assert "<tool_call>" in new[2]["content"]  # the model sees what it wrote, then why it is no call
    assert json.loads(new[5]["content"])["error"].startswith("unknown tool 'get_weather'")
    assert new[-1] == {"role": "assistant", "content": "256 × 37 = 9472."}
    assert prompts == [question + new[:k] for k in (0, 2, 4, 6)]  # each reply saw everything before it


def test_the_loop_stops_after_max_rounds_and_when_a_reply_fails(toolbox):
    call = '<tool_call>{"name": "get_capital", "arguments": {"country": "Spain"}}</tool_call>'
    new = list(tool_loop(scripted([call] * 5, []), [{"role": "user", "content": "?"}], toolbox, max_rounds=2))
    assert [m["role"] for m in new] == ["assistant", "tool", "assistant", "tool", "assistant"]  # last call unanswered
    assert list(tool_loop(lambda messages: None, [], toolbox)) == []


def test_importing_the_tools_does_not_import_torch():
    code = "import sys, model.tools; import scripts.chat_openai_api; assert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@needs_tokenizer
def test_the_chat_client_runs_the_calls_the_server_returns_with_thinking_on(monkeypatch, capsys):
    from argparse import Namespace

    from fastapi.testclient import TestClient
    from openai import OpenAI

    from model import MiniMindConfig, MiniMindForCausalLM
    from model.generation import ReplyStream
    from model.tools import chat_exchange
    from scripts import serve_openai_api
    from scripts.chat_openai_api import reply
    from tests.test_eval_llm import SHAPE

    prompts, replies = [], iter(['Multiply.\n</think>\n\n<tool_call>{"name": "calculate_math", "arguments": '
                                 '{"expression": "6*7"}}</tool_call>', "It said 42.\n</think>\n\n42."])

    class Scripted(ReplyStream):
        def __iter__(self):
            prompts.append(self.tokenizer.decode(self.input_ids[0]))
            self.text = next(replies)
            yield self.text

    monkeypatch.setattr(serve_openai_api, "ReplyStream", Scripted)
    app = serve_openai_api.create_app(MiniMindForCausalLM(MiniMindConfig(**SHAPE)), load_tokenizer(), max_tokens=8)
    toolbox = Toolbox(["calculate_math"])
    with TestClient(app) as http:
        client = OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)
        args = Namespace(model="minimind", temperature=0, max_tokens=8)
        new = chat_exchange(lambda history: reply(client, args, history, toolbox.schemas(), True),
                            [{"role": "user", "content": "6*7?"}], toolbox)
    assert [m["role"] for m in new] == ["assistant", "tool", "assistant"] and new[-1]["content"] == "42."
    assert new[1] == {"role": "tool", "tool_call_id": new[0]["tool_calls"][0]["id"],
                      "content": '{"expression": "6*7", "result": 42}'}
    assert prompts[0].endswith("assistant\n<think>\n") and "<tool_response>\n{\"expression\"" in prompts[1]
    out = capsys.readouterr().out
    assert out == ('🤖: (thinking) Multiply.\n📞 calculate_math({"expression": "6*7"})\n'
                   '🔧 {"expression": "6*7", "result": 42}\n🤖: (thinking) It said 42.\n42.\n')


def test_the_chat_client_joins_a_call_streamed_in_pieces():
    from argparse import Namespace
    from types import SimpleNamespace

    from scripts.chat_openai_api import reply

    def chunk(index=0, id=None, name=None, arguments=None):
        call = SimpleNamespace(index=index, id=id, function=SimpleNamespace(name=name, arguments=arguments))
        return SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=None, tool_calls=[call]))])

    class Stream(list):  # what vLLM streams: the id and name first, then the arguments in pieces
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    pieces = Stream([chunk(id="call_7", name="get_capital", arguments=""), chunk(arguments='{"country": '),
                     chunk(arguments='"France"}'), chunk(index=1, id="call_8", name="get_capital"),
                     chunk(index=1, arguments='{"country": "Peru"}')])
    client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=lambda **kw: pieces)))
    message = reply(client, Namespace(model="m", temperature=0, max_tokens=8), [], Toolbox().schemas())
    assert message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "get_capital", "arguments": '{"country": "France"}'}},
        {"id": "call_8", "type": "function", "function": {"name": "get_capital", "arguments": '{"country": "Peru"}'}}]}
