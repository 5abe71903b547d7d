"""model/chat_template.jinja byte for byte: every row kind and every thinking switch, and where (and why) it differs
from minimind-3's template (tests/fixtures/minimind3_chat_template.jinja, Apache-2.0, verbatim)."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model.tools import Toolbox

MODEL_DIR = Path(__file__).resolve().parents[1] / "model"
MINIMIND3 = (Path(__file__).parent / "fixtures" / "minimind3_chat_template.jinja").read_text(encoding="utf-8")
TOOLS = Toolbox(["get_capital"]).schemas()
TOOLS_BLOCK = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
               "function signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False)
               + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_capital", "arguments": '{"country": "France"}'}}
PLAIN = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
         {"role": "user", "content": "1+1=?"}]
REASONING = [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2", "reasoning_content": "Add."},
             {"role": "user", "content": "2+2=?"}]
TOOL_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
             {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call_1", "content": '{"capital": "Paris"}'},
             {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
CONVERSATIONS = {"plain": (PLAIN, None), "reasoning": (REASONING, None), "tools": (TOOL_CHAT, TOOLS)}
PROMPT = {None: "<|im_start|>assistant\n", True: "<|im_start|>assistant\n<think>\n",
          False: "<|im_start|>assistant\n<think>\n\n</think>\n\n"}
EMPTY_THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


def render(tok, messages, tools=None, template=None, **switches) -> str:
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, chat_template=template, **switches)


def test_each_row_kind_renders_byte_for_byte(tok):
    assert render(tok, PLAIN[:2]) == "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n"
    assert render(tok, REASONING[:2]) == ("<|im_start|>user\n1+1=?<|im_end|>\n"
                                          "<|im_start|>assistant\n<think>\nAdd.\n</think>\n\n2<|im_end|>\n")
    empty = [REASONING[0], {**REASONING[1], "reasoning_content": ""}]  # SFT's --empty_think_ratio rows
    assert render(tok, empty) == f"<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n{EMPTY_THINK}2<|im_end|>\n"
    assert render(tok, TOOL_CHAT[:5], TOOLS) == (
        f"<|im_start|>system\nBe brief.\n\n{TOOLS_BLOCK}<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_capital", "arguments": {"country": "France"}}\n'
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"capital\": \"Paris\"}\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n")


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("switch", [None, True, False])
def test_the_generation_prompt_follows_the_switch_under_either_name(tok, name, switch):
    messages, tools = CONVERSATIONS[name]
    history = render(tok, messages, tools)
    for spelling in ("open_thinking", "enable_thinking"):
        kwargs = {} if switch is None else {spelling: switch}
        assert render(tok, messages, tools, add_generation_prompt=True, **kwargs) == history + PROMPT[switch]
    if switch is not None:  # both given: MiniMind's name wins
        both = render(tok, messages, tools, add_generation_prompt=True, open_thinking=switch, enable_thinking=not switch)
        assert both == history + PROMPT[switch]


def with_reasoning(messages):
    """Every assistant turn with a reasoning_content string ("" when it has none): what minimind-3 renders anyway."""
    return [{**m, "reasoning_content": m.get("reasoning_content", "")} if m["role"] == "assistant" else m
            for m in messages]


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("switch", [True, False])
def test_with_reasoning_strings_and_an_explicit_switch_we_render_exactly_minimind3(tok, name, switch):
    messages, tools = CONVERSATIONS[name]
    for prompt in (False, True):
        kwargs = dict(add_generation_prompt=prompt, open_thinking=switch)
        ours = render(tok, with_reasoning(messages), tools, **kwargs)
        assert ours == render(tok, with_reasoning(messages), tools, MINIMIND3, **kwargs)
        assert ours == render(tok, messages, tools, MINIMIND3, **kwargs)  # it adds the empty blocks itself


def test_the_differences_from_minimind3(tok):
    # 1. A reply without reasoning_content: no think block here, an empty one there (models trained here never saw
    #    one; SFT's --empty_think_ratio adds them to a share of rows, as minimind-3's SFT keeps them in 20%).
    ours, theirs = render(tok, PLAIN), render(tok, PLAIN, template=MINIMIND3)
    assert theirs == ours.replace("<|im_start|>assistant\n", "<|im_start|>assistant\n" + EMPTY_THINK)
    # 2. No switch: our prompt ends at "assistant\n" (backwards compatible: the model decides), theirs closes an
    #    empty block (answer directly).
    gen = dict(add_generation_prompt=True)
    assert render(tok, PLAIN, **gen).endswith(PROMPT[None])
    assert render(tok, PLAIN, template=MINIMIND3, **gen).endswith(PROMPT[False])
    # 3. enable_thinking (Qwen3's / vLLM's name) works here; there it is ignored.
    assert render(tok, PLAIN, template=MINIMIND3, enable_thinking=True, **gen).endswith(PROMPT[False])
    # 4. Tools in the system turn's own `tools` field (how MiniMind's files store them) reach the prompt here; theirs
    #    reads only the tools= argument (its SFT loader moves them there).
    in_row = [{"role": "system", "content": "Be brief.", "tools": TOOLS}, PLAIN[0]]
    assert TOOLS_BLOCK in render(tok, in_row) and "# Tools" not in render(tok, in_row, template=MINIMIND3)
    # 5. An empty system turn with tools: no blank lines before the tools here, two there.
    empty_system = [{"role": "system", "content": ""}, PLAIN[0]]
    assert render(tok, empty_system, TOOLS).startswith(f"<|im_start|>system\n{TOOLS_BLOCK}")
    assert render(tok, empty_system, TOOLS, MINIMIND3).startswith(f"<|im_start|>system\n\n\n{TOOLS_BLOCK}")
    # 6. Reasoning written inside content (MiniMind2's r1 rows): verbatim here, re-spaced into a block there.
    inline = [PLAIN[0], {"role": "assistant", "content": "<think>hm</think>Hi"}]
    assert render(tok, inline).endswith("assistant\n<think>hm</think>Hi<|im_end|>\n")
    assert render(tok, inline, template=MINIMIND3).endswith("assistant\n<think>\nhm\n</think>\n\nHi<|im_end|>\n")
    # 7. The answer after reasoning keeps its leading newlines here; they are stripped there.
    spaced = [PLAIN[0], {"role": "assistant", "content": "\nHi", "reasoning_content": "hm"}]
    assert render(tok, spaced).endswith("</think>\n\n\nHi<|im_end|>\n")
    assert render(tok, spaced, template=MINIMIND3).endswith("</think>\n\nHi<|im_end|>\n")
    # 8. A role the template does not know is rendered as ChatML here, dropped there.
    other = [PLAIN[0], {"role": "observation", "content": "42"}]
    assert render(tok, other).endswith("<|im_start|>observation\n42<|im_end|>\n")
    assert "42" not in render(tok, other, template=MINIMIND3)
