"""The thinking switch end to end: a reply that starts inside the <think> block its prompt opened is still split;
eval_llm.py --open_thinking, the server's chat_template_kwargs / enable_thinking, SFT's --empty_think_ratio."""

import json
import runpy
from argparse import Namespace

import pytest

from model.generation import ReasoningSplit, ReplyStream, answer_start, opens_thinking, split_reasoning
from model.files import REPO_ROOT
from model.loading import load_tokenizer
from tests.test_eval_llm import needs_tokenizer
from tests.test_server import app  # noqa: F401  (a fixture: the server app around a tiny model)

OPEN = ["Add the", " two.\n</th", "ink>\n\n", "2"]  # what follows a prompt ending in "<think>\n"


def test_a_reply_inside_an_opened_block_splits_into_reasoning_and_answer():
    reply = "".join(OPEN)
    assert split_reasoning(reply, thinking_open=True) == ("Add the two.", "2")
    assert split_reasoning(reply) == ("", reply)  # without the flag it is all answer, as before
    assert answer_start(reply, thinking_open=True) == reply.index("\n\n2")
    assert answer_start("still thinking", thinking_open=True) is None
    assert split_reasoning("cut off mid-thou", thinking_open=True) == ("cut off mid-thou", "")
    for cut in range(len(reply) + 1):  # streamed in two pieces at every point: the same as the whole
        split = ReasoningSplit(thinking_open=True)
        parts = [split.feed(reply[:cut]), split.feed(reply[cut:]), split.feed("", done=True)]
        assert ("".join(r for r, _ in parts), "".join(a for _, a in parts)) == ("Add the two.", "2")
    assert opens_thinking("<|im_start|>assistant\n<think>\n") and not opens_thinking("<|im_start|>assistant\n")
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def scripted(pieces: list[str], prompts: list[str]) -> type:
    """A ReplyStream that says ``pieces`` and records the prompt it was given."""

    class Scripted(ReplyStream):
        def __init__(self, model, tokenizer, prompt, config):
            super().__init__(model, tokenizer, prompt, config)
            prompts.append(prompt)

        def __iter__(self):
            self.completion_tokens, self.text = len(pieces), "".join(pieces)
            yield from pieces

    return Scripted


@needs_tokenizer
def test_eval_llm_open_thinking_opens_the_block_and_shows_the_thinking_apart(monkeypatch, capsys):
    from model import MiniMindConfig, MiniMindForCausalLM
    from tests.test_eval_llm import SHAPE

    eval_llm = runpy.run_path(str(REPO_ROOT / "eval_llm.py"))
    prompts: list[str] = []
    monkeypatch.setitem(eval_llm["respond"].__globals__, "ReplyStream", scripted(OPEN, prompts))
    model, tokenizer = MiniMindForCausalLM(MiniMindConfig(**SHAPE)), load_tokenizer()
    config = eval_llm["generation_config"](tokenizer, 8)
    question = [{"role": "user", "content": "1+1=?"}]
    for flag, prompt_end in ((1, "assistant\n<think>\n"), (0, "assistant\n<think>\n\n</think>\n\n"),
                             (None, "1+1=?<|im_end|>\n<|im_start|>assistant\n")):
        args = eval_llm["parse_args"]([] if flag is None else ["--open_thinking", str(flag)])
        args.show_speed = 0
        new = eval_llm["converse"](model, tokenizer, config, question, args)
        assert prompts[-1].endswith(prompt_end)
        if flag == 1:
            assert new == [{"role": "assistant", "content": "2"}]
            assert capsys.readouterr().out == "🤖: (thinking) Add the two.\n2\n"
    capsys.readouterr()


@needs_tokenizer
def test_eval_llm_tools_runs_the_calls_and_shows_their_answers(monkeypatch, capsys):
    from model import MiniMindConfig, MiniMindForCausalLM
    from tests.test_eval_llm import SHAPE

    eval_llm = runpy.run_path(str(REPO_ROOT / "eval_llm.py"))
    replies = iter(['<tool_call>{"name": "calculate_math", "arguments": {"expression": "6*7"}}</tool_call>', "42."])
    prompts: list[str] = []

    class Replies(scripted([], prompts)):
        def __iter__(self):
            yield next(replies)

    monkeypatch.setitem(eval_llm["respond"].__globals__, "ReplyStream", Replies)
    args = eval_llm["parse_args"](["--tools", "calculate_math", "--show_speed", "0"])
    tokenizer = load_tokenizer()
    new = eval_llm["converse"](MiniMindForCausalLM(MiniMindConfig(**SHAPE)), tokenizer,
                               eval_llm["generation_config"](tokenizer, 8), [{"role": "user", "content": "6*7?"}], args)
    assert [m["role"] for m in new] == ["assistant", "tool", "assistant"] and new[-1]["content"] == "42."
    assert '"name": "calculate_math"' in prompts[0] and "<tool_response>" in prompts[1]
    assert '🔧 {"expression": "6*7", "result": 42}\n' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_llm["parse_args"](["--tools", "get_weather"])
    assert "unknown tool get_weather" in capsys.readouterr().err


@needs_tokenizer
@pytest.mark.parametrize("switch, reasoning, content", [
    ({"chat_template_kwargs": {"open_thinking": True}}, "Add the two.", "2"),
    ({"chat_template_kwargs": {"enable_thinking": True}}, "Add the two.", "2"),
    ({"enable_thinking": True}, "Add the two.", "2"),
    ({"open_thinking": True, "chat_template_kwargs": {"open_thinking": False}}, None, "".join(OPEN)),  # kwargs win
    ({}, None, "".join(OPEN)),
])
def test_the_server_takes_the_switch_as_other_servers_spell_it(app, monkeypatch, switch, reasoning, content):  # noqa: F811
    from fastapi.testclient import TestClient

    from scripts import serve_openai_api

    prompts: list[str] = []
    monkeypatch.setattr(serve_openai_api, "ReplyStream", scripted(OPEN, prompts))
    body = {"messages": [{"role": "user", "content": "1+1=?"}], **switch}
    with TestClient(app) as client:
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert (message.get("reasoning_content"), message["content"]) == (reasoning, content)
        events = client.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n")
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events if e.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == (reasoning or "")
    assert "".join(d.get("content", "") for d in deltas) == content
    assert prompts[0] == prompts[1] and prompts[0].endswith("<think>\n") == (reasoning is not None)


@needs_tokenizer
def test_the_server_refuses_a_switch_that_is_not_a_boolean(app):  # noqa: F811
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "chat_template_kwargs": {"open_thinking": "yes"}})
    assert reply.status_code == 400 and "open_thinking must be true or false" in reply.json()["error"]["message"]


@needs_tokenizer
def test_sft_empty_think_ratio_renders_that_share_of_rows_with_empty_blocks_the_same_every_time(tmp_path):
    from dataset import SFTDataset

    tokenizer = load_tokenizer()
    rows = [{"conversations": [{"role": "user", "content": f"{i}+1=?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(200)]
    rows[0]["conversations"][1]["reasoning_content"] = "Count on."
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def rendered(ratio: float) -> list[str]:
        data = SFTDataset(path, tokenizer, 64, cache_dir=tmp_path, empty_think_ratio=ratio)
        return [tokenizer.decode(data[i]["input_ids"]) for i in range(len(data))]

    empty = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert not any(empty in text for text in rendered(0.0))
    with_empty = [empty in text for text in rendered(0.3)]
    assert 40 <= sum(with_empty) <= 80 and with_empty == [empty in text for text in rendered(0.3)]
    everything = rendered(1.0)
    assert all(empty in text for text in everything[1:]) and "<think>\nCount on.\n</think>" in everything[0]
    data = SFTDataset(path, tokenizer, 64, cache_dir=tmp_path, empty_think_ratio=1.0)
    item = data[1]
    supervised = tokenizer.decode(item["input_ids"][item["labels"] != -100])
    assert supervised == "<think>\n\n</think>\n\n2<|im_end|>"  # the block is part of the reply it learns
    with pytest.raises(ValueError, match="between 0 and 1"):
        SFTDataset(path, tokenizer, 64, cache_dir=tmp_path, empty_think_ratio=1.5)


def test_sft_empty_think_ratio_needs_a_template_that_shows_empty_reasoning(tmp_path):
    from dataset import SFTDataset
    from tests.test_dataset import make_tokenizer  # its template shows reasoning only when there is some

    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"},
                                                  {"role": "assistant", "content": "yo"}]}) + "\n")
    assert SFTDataset(path, make_tokenizer(), 64, cache_dir=tmp_path)[0]  # 0: no need
    with pytest.raises(ValueError, match="empty <think> block"):
        SFTDataset(path, make_tokenizer(), 64, cache_dir=tmp_path, empty_think_ratio=0.2)


def test_train_full_sft_takes_the_ratio(capsys, tmp_path):
    from trainer.chat_data import chat_data as sft_data
    from trainer.train_full_sft import main

    with pytest.raises(SystemExit) as exit:
        main(["--empty_think_ratio", "1.5"])
    assert exit.value.code == 2 and "--empty_think_ratio is a share of rows" in capsys.readouterr().err
    args = Namespace(data_path=str(REPO_ROOT / "dataset" / "demo" / "sft_tools.jsonl"), max_seq_len=64,
                     skip_bad_lines=False, cache_dir=tmp_path, empty_think_ratio=0.25, loss_turns="all", mix_data=None)
    assert sft_data(args, load_tokenizer()).empty_think_ratio == 0.25
