"""scripts/eval_toolcall.py: the cases are answerable, the scores mean what they say, and our server scores a
checkpoint exactly as the local path does. Also the tool-use demo rows (scripts/make_tool_data.py)."""

import json

import pytest

from model.files import REPO_ROOT
from model.loading import load_tokenizer
from model.tools import assistant_turn, split_tool_calls
from scripts.eval_toolcall import CASES, CRITERIA, main, run_benchmark, run_case, states
from tests.test_eval_llm import needs_tokenizer
from tests.test_server import API_KEY, out, server  # noqa: F401  (fixtures: a tiny checkpoint, served)

BY_ID = {case.id: case for case in CASES}


def call_text(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>"


def oracle_reply(messages: list[dict]) -> str:
    """What a perfect model says: the calls the case needs, then the tools' answers."""
    case = next(case for case in CASES if case.prompt == messages[0]["content"])
    if messages[-1]["role"] == "user":
        return "".join(call_text(name, arguments) for name, arguments in case.calls) or "Hello, I am MiniMind."
    return "The tools say: " + " ".join(m["content"] for m in messages if m["role"] == "tool")


def as_ask(reply):
    return lambda messages, tools: assistant_turn(*split_tool_calls(reply(messages)))


def test_a_model_that_calls_what_is_needed_and_repeats_the_answers_passes_every_case(capsys):
    assert len(CASES) >= 20 and {"zh", "en"} <= {case.id.split("-")[1] for case in CASES}
    records = run_benchmark(CASES, as_ask(oracle_reply), max_tool_rounds=3)
    assert all(record["passed"] for record in records)
    total = len(CASES)
    assert capsys.readouterr().out.endswith(f"format {total}/{total} · tool {total}/{total} · arguments "
                                            f"{total}/{total} · answer {total}/{total} · passed {total}/{total}\n")


def scores(case_id: str, *replies: str, max_tool_rounds: int = 3) -> tuple[bool, ...]:
    replies_left = iter(replies)
    record = run_case(BY_ID[case_id], as_ask(lambda messages: next(replies_left)), max_tool_rounds)
    return tuple(record[k] for k in CRITERIA)


def test_each_criterion_scores_what_it_names():
    calc = lambda expression: call_text("calculate_math", {"expression": expression})  # noqa: E731
    # the same call written otherwise computes the same, and "9,472" states 9472
    assert scores("calc-zh", calc("37 * 256"), "结果是 9,472。") == (True, True, True, True)
    assert scores("calc-zh", calc("256*36"), "9216") == (True, True, False, False)  # wrong arguments
    assert scores("calc-zh", call_text("get_current_time", {}), "9472") == (True, False, False, True)  # wrong tool
    assert scores("calc-zh", '<tool_call>{"name": "calculate_math", "arguments": </tool_call>', "9472") == (
        False, False, False, True)  # malformed: the model sees an error and answers anyway
    assert scores("calc-zh", '<tool_call>{"name": "calculate_math", "arguments": "256*37"}</tool_call>', "9472") == (
        False, True, False, True)  # arguments that are not a JSON object
    assert scores("calc-zh", "9472") == (False, False, False, True)  # no call: a guess is not tool use
    assert scores("calc-zh", calc("256*37"), calc("256*37"), max_tool_rounds=1) == (True, True, True, False)
    assert scores("two-en", call_text("get_capital", {"country": "日本"}), "Tokyo, 36") == (
        True, False, False, True)  # one of two calls
    assert scores("none-en", "Hi!") == (True, True, True, True)
    assert scores("none-en", calc("1+1"), "Hi!") == (True, False, False, True)


@pytest.mark.parametrize("answer, stated", [("about 62.14 miles", True), ("62.1", True), ("62 miles", True),
                                            ("62.2", False), ("60", False), ("621371", False)])
def test_numbers_count_at_the_precision_the_answer_gives(answer, stated):
    assert states(answer, 62.1371) == stated


def scripted_model(prompts_seen: list[str]) -> type:
    """A ReplyStream for both paths that answers from the prompt alone: the oracle for most cases, a malformed call
    for the km case and an unknown tool for the capital case (so the scores are mixed)."""
    from model.generation import ReplyStream

    class Scripted(ReplyStream):
        def __iter__(self):
            prompt = self.tokenizer.decode(self.input_ids[0])
            prompts_seen.append(prompt)
            case = next(case for case in CASES if f"user\n{case.prompt}<|im_end|>" in prompt)
            if "<tool_response>" in prompt:
                reply = "Done: " + " ".join(prompt.split("<tool_response>\n")[1:]).replace("</tool_response>", "")
            elif case.id == "km-zh":
                reply = '<tool_call>{"name": "unit_converter", "arguments": {"value": 100,</tool_call>'
            elif case.id == "capital-en":
                reply = call_text("get_weather", {"city": "Ottawa"})
            else:
                reply = "".join(call_text(name, arguments) for name, arguments in case.calls) or "Hi."
            self.completion_tokens, self.text = 1, reply
            yield reply

    return Scripted


def comparable(records: list[dict]) -> list[dict]:
    """Records without the calls' ids, which are fresh in every run."""
    text = json.dumps(records, ensure_ascii=False)
    for record in records:
        for message in record["transcript"]:
            for call in message.get("tool_calls") or []:
                text = text.replace(call["id"], "call_x")
    return json.loads(text)


@needs_tokenizer
def test_the_server_and_the_local_path_score_the_same_replies_the_same(out, monkeypatch):  # noqa: F811
    from fastapi.testclient import TestClient
    from openai import OpenAI

    from model import MiniMindConfig, MiniMindForCausalLM
    from scripts import eval_toolcall, serve_openai_api
    from tests.test_eval_llm import SHAPE

    app = serve_openai_api.create_app(MiniMindForCausalLM(MiniMindConfig(**{**SHAPE, "max_position_embeddings": 4096})),
                                      load_tokenizer(), max_tokens=64)

    local_prompts, served_prompts = [], []
    monkeypatch.setattr(eval_toolcall, "ReplyStream", scripted_model(local_prompts))
    monkeypatch.setattr(serve_openai_api, "ReplyStream", scripted_model(served_prompts))
    local = main(["--weight", "full_sft", "--hidden_size", "64", "--out_dir", str(out), "--max_new_tokens", "8"])
    with TestClient(app) as http:
        served = main(["--max_new_tokens", "8"], client=OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http))
    assert comparable(served) == comparable(local) and local_prompts == served_prompts
    passed = sum(record["passed"] for record in local)
    assert passed == len(CASES) - 2 and not any(r["passed"] for r in local if r["id"] in ("km-zh", "capital-en"))


@needs_tokenizer
def test_a_tiny_checkpoint_scores_the_same_locally_and_through_our_server(server, out, tmp_path):  # noqa: F811
    common = ["--max_new_tokens", "12", "--cases", "calc-zh", "temp-en", "two-zh", "none-zh"]
    local = main(common + ["--weight", "full_sft", "--hidden_size", "64", "--out_dir", str(out),
                           "--out", str(tmp_path / "local.json")])
    served = main(common + ["--base_url", server, "--api_key", API_KEY])
    assert comparable(served) == comparable(local)
    assert json.loads((tmp_path / "local.json").read_text()) == local
    assert all(len(record["transcript"]) >= 1 for record in local)


def test_the_demo_rows_regenerate_byte_for_byte_and_hold_no_benchmark_question(tmp_path):
    from scripts.make_tool_data import AGENT_OUT, OUT
    from scripts.make_tool_data import main as make

    make(["--out", str(tmp_path / "rows.jsonl"), "--agent_out", str(tmp_path / "agent.jsonl")])
    assert (tmp_path / "rows.jsonl").read_bytes() == OUT.read_bytes()
    assert (tmp_path / "agent.jsonl").read_bytes() == AGENT_OUT.read_bytes()
    rows = [json.loads(line) for line in OUT.read_text(encoding="utf-8").splitlines()]
    agent_rows = [json.loads(line) for line in AGENT_OUT.read_text(encoding="utf-8").splitlines()]
    questions = {row["conversations"][1]["content"] for row in rows + agent_rows}
    assert not questions & {case.prompt for case in CASES}
    assert {len(row["gt"]) for row in agent_rows} == {0, 1, 2}  # one fact per call needed: none, one or two
    tool_turns = [turn for row in rows for turn in row["conversations"] if turn["role"] == "tool"]
    assert len(tool_turns) > len(rows) // 2 and not any('"error"' in turn["content"] for turn in tool_turns)


@needs_tokenizer
def test_the_demo_rows_train_the_calls_and_answers_not_the_tool_answers(tmp_path):
    from dataset import SFTDataset
    from scripts.make_tool_data import OUT

    tokenizer = load_tokenizer()
    data = SFTDataset(OUT, tokenizer, 1024, cache_dir=tmp_path)
    lengths = [len(data[i]["input_ids"]) for i in range(len(data))]
    assert max(lengths) < 1024  # nothing is cut at the demo's sequence length
    rows = [json.loads(line) for line in OUT.read_text(encoding="utf-8").splitlines()]
    k = next(k for k, row in enumerate(rows) if [t["role"] for t in row["conversations"]].count("tool") == 1)
    call, = json.loads(rows[k]["conversations"][2]["tool_calls"])
    item = data[k]
    supervised = tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert supervised == (f'<tool_call>\n{{"name": "{call["name"]}", "arguments": '
                          f'{json.dumps(call["arguments"], ensure_ascii=False)}}}\n</tool_call><|im_end|>'
                          f'{rows[k]["conversations"][4]["content"]}<|im_end|>')  # not the tool's answer
    assert (REPO_ROOT / "dataset" / "demo" / "README.md").read_text().count("sft_tools.jsonl") >= 1
