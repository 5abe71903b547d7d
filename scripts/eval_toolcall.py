"""Score tool calling: fixed cases, each with its tools, the call(s) it needs and the fact its answer must state.
工具调用评测：中英文用例，逐项打分。

    python scripts/eval_toolcall.py --weight full_sft                       # our checkpoint, out/full_sft_512.pth
    python scripts/eval_toolcall.py --weight ~/minimind-3/full_sft_768.pth --tokenizer ~/minimind-3   # MiniMind's
    python scripts/eval_toolcall.py --base_url http://127.0.0.1:8998/v1     # any OpenAI-compatible server:
    python scripts/eval_toolcall.py --base_url http://127.0.0.1:11434/v1 --model jingyaogong/minimind-3  # Ollama

Each case runs the tool loop of model/tools.py (the tools really run, with the clock fixed at CLOCK), up to
--max_tool_rounds rounds, and is scored on four things:
  format     every <tool_call> the model wrote parses as {"name": ..., "arguments": {...}}, and it made a call
             (if the case needs one)
  tool       it called exactly the tools the case needs (none, for the cases that need none)
  arguments  each needed call was made with arguments that give the tool's expected answer ("256 * 37" and
             "37*256" both compute 9472; "法国" and "France" both find Paris)
  answer     its final reply states every fact (a number counts at the precision the reply gives: 62.1 for
             62.1371); for a case that needs no tool, it answers at all
A case passes when all four hold. Replies are greedy by default (--temperature 0), so a run is repeatable.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from openai import APIConnectionError, APIError, OpenAI

from model.cli import HelpFormatter
from model.generation import ReplyStream, chat_prompt, generation_config, opens_thinking, split_reasoning
from model.loading import add_model_args, model_from_args
from model.tools import Toolbox, assistant_turn, malformed_tool_calls, split_tool_calls, tool_loop

CLOCK = datetime(2026, 3, 14, 15, 9, 26, tzinfo=timezone.utc)  # "now" for every case: 23:09 in Beijing, a Saturday
CRITERIA = ("format", "tool", "arguments", "answer")
Ask = Callable[[list[dict[str, Any]], list[dict[str, Any]]], dict[str, Any]]  # (messages, tools) -> assistant turn


@dataclass(frozen=True)
class Case:
    id: str
    prompt: str
    tools: tuple[str, ...]  # offered to the model: the needed ones and some it should leave alone
    calls: tuple[tuple[str, dict[str, Any]], ...] = ()  # the calls it needs, with arguments that answer them
    facts: tuple[str | float | tuple[str, ...], ...] = ()  # each in the final answer (a tuple: any one of them)


CASES = [
    Case("calc-zh", "帮我算一下 256 乘以 37 等于多少", ("calculate_math", "get_current_time"),
         (("calculate_math", {"expression": "256*37"}),), (9472,)),
    Case("calc-en", "What is 1234 + 5678 * 2?", ("calculate_math", "unit_converter"),
         (("calculate_math", {"expression": "1234+5678*2"}),), (12590,)),
    Case("power-zh", "2 的 20 次方是多少？", ("calculate_math", "get_element_info"),
         (("calculate_math", {"expression": "2**20"}),), (1048576,)),
    Case("sqrt-en", "What's the square root of 7569?", ("calculate_math", "days_between"),
         (("calculate_math", {"expression": "sqrt(7569)"}),), (87,)),
    Case("km-zh", "帮我把100公里换算成英里", ("unit_converter", "calculate_math"),
         (("unit_converter", {"value": 100, "from_unit": "km", "to_unit": "mile"}),), (62.1371,)),
    Case("temp-en", "Convert 30 degrees Celsius to Fahrenheit.", ("unit_converter", "get_current_time"),
         (("unit_converter", {"value": 30, "from_unit": "celsius", "to_unit": "fahrenheit"}),), (86,)),
    Case("pound-zh", "5 磅等于多少千克？", ("unit_converter", "calculate_math"),
         (("unit_converter", {"value": 5, "from_unit": "pound", "to_unit": "kg"}),), (2.26796,)),
    Case("feet-en", "How many feet are in 1000 meters?", ("unit_converter", "get_capital"),
         (("unit_converter", {"value": 1000, "from_unit": "m", "to_unit": "foot"}),), (3280.84,)),
    Case("time-zh", "现在北京时间几点？", ("get_current_time", "calculate_math"),
         (("get_current_time", {"timezone": "Asia/Shanghai"}),), ("23:09",)),
    Case("time-en", "What time is it in Tokyo right now?", ("get_current_time", "unit_converter"),
         (("get_current_time", {"timezone": "Asia/Tokyo"}),), ("00:09",)),
    Case("weekday-en", "What day of the week is it in New York today?", ("get_current_time", "days_between"),
         (("get_current_time", {"timezone": "America/New_York"}),), (("Saturday", "星期六", "周六"),)),
    Case("days-zh", "2026年1月1日到2026年10月1日一共有多少天？", ("days_between", "calculate_math"),
         (("days_between", {"start_date": "2026-01-01", "end_date": "2026-10-01"}),), (273,)),
    Case("days-en", "How many days are there from 2024-02-01 to 2024-03-01?", ("days_between", "get_current_time"),
         (("days_between", {"start_date": "2024-02-01", "end_date": "2024-03-01"}),), (29,)),
    Case("capital-zh", "澳大利亚的首都是哪里？", ("get_capital", "get_element_info"),
         (("get_capital", {"country": "Australia"}),), (("堪培拉", "Canberra"),)),
    Case("capital-en", "What is the capital of Canada?", ("get_capital", "calculate_math"),
         (("get_capital", {"country": "Canada"}),), (("Ottawa", "渥太华"),)),
    Case("capital-zh-2", "土耳其的首都是哪个城市？", ("get_capital", "get_current_time"),
         (("get_capital", {"country": "Turkey"}),), (("安卡拉", "Ankara"),)),
    Case("element-zh", "铁的原子序数是多少？", ("get_element_info", "calculate_math"),
         (("get_element_info", {"element": "Fe"}),), (26,)),
    Case("element-en", "What is the chemical symbol of gold?", ("get_element_info", "get_capital"),
         (("get_element_info", {"element": "gold"}),), ("Au",)),
    Case("mass-en", "What is the atomic mass of sodium?", ("get_element_info", "unit_converter"),
         (("get_element_info", {"element": "sodium"}),), (22.99,)),
    Case("two-en", "What is the capital of Japan, and what is 15% of 240?",
         ("get_capital", "calculate_math", "get_current_time"),
         (("get_capital", {"country": "Japan"}), ("calculate_math", {"expression": "240*0.15"})),
         (("Tokyo", "东京"), 36)),
    Case("two-zh", "把 25 摄氏度换算成华氏度，再告诉我现在东京的时间。",
         ("unit_converter", "get_current_time", "calculate_math"),
         (("unit_converter", {"value": 25, "from_unit": "celsius", "to_unit": "fahrenheit"}),
          ("get_current_time", {"timezone": "Asia/Tokyo"})), (77, "00:09")),
    Case("none-en", "Hello! Who are you?", ("calculate_math",)),
    Case("none-zh", "给我讲一个简短的笑话。", ("get_capital",)),
]


# ----------------------------------------------------------------------------------------------------------------------
# scoring

def _without_echo(toolbox: Toolbox, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """A tool's answer less what it repeats of its arguments (calculate_math echoes the expression as written)."""
    return {k: v for k, v in result.items() if k not in toolbox.tools[name].parameters["properties"]}


def states(answer: str, fact: str | float | tuple) -> bool:
    """Whether ``answer`` states ``fact``: a string as written (any case); a number at the answer's precision."""
    if isinstance(fact, tuple):
        return any(states(answer, alternative) for alternative in fact)
    if isinstance(fact, str):
        return fact.casefold() in answer.casefold()
    numbers = re.findall(r"\d+(?:\.\d+)?", re.sub(r"(?<=\d),(?=\d{3})", "", answer))  # 12,590 -> 12590
    return any(float(n) == round(fact, len(n.partition(".")[2])) for n in numbers)


def _is_object(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except json.JSONDecodeError:
        return False


def score(case: Case, transcript: list[dict[str, Any]], toolbox: Toolbox) -> dict[str, bool]:
    replies = [m for m in transcript if m["role"] == "assistant"]
    made = [call["function"] for reply in replies for call in reply.get("tool_calls") or []]
    malformed = any(malformed_tool_calls(reply["content"] or "") for reply in replies)
    final = replies[-1] if replies and not replies[-1].get("tool_calls") else None
    needed = [(name, _without_echo(toolbox, name, toolbox.call(name, args))) for name, args in case.calls]
    given = [(call["name"], _without_echo(toolbox, call["name"], toolbox.call(call["name"], call["arguments"])))
             for call in made if call["name"] in toolbox.tools]
    answer = (final["content"] or "") if final else ""
    return {
        "format": not malformed and all(_is_object(call["arguments"]) for call in made) and (bool(made) or not needed),
        "tool": {call["name"] for call in made} == {name for name, _ in needed},
        "arguments": all(call in given for call in needed) if needed else not made,
        "answer": bool(answer.strip()) and all(states(answer, fact) for fact in case.facts),
    }


class ReplyFailed(RuntimeError):
    """An endpoint refused a request of one case; the case fails, the benchmark goes on."""


def run_case(case: Case, ask: Ask, max_tool_rounds: int) -> dict[str, Any]:
    """The case's transcript (user turn, replies, tool turns) and its scores; an endpoint's error fails the case."""
    toolbox = Toolbox(case.tools, clock=lambda: CLOCK)
    messages = [{"role": "user", "content": case.prompt}]
    transcript: list[dict[str, Any]] = []
    try:
        for message in tool_loop(lambda history: ask(history, toolbox.schemas()), messages, toolbox, max_tool_rounds):
            transcript.append(message)
    except ReplyFailed as e:
        return {"id": case.id, "transcript": transcript, "error": str(e), **dict.fromkeys(CRITERIA, False),
                "passed": False}
    scores = score(case, transcript, toolbox)
    return {"id": case.id, "transcript": transcript, **scores, "passed": all(scores.values())}


# ----------------------------------------------------------------------------------------------------------------------
# the two ways to ask: a local checkpoint, or an OpenAI-compatible endpoint

def local_ask(args: argparse.Namespace) -> Ask:
    """Replies from a checkpoint loaded as eval_llm.py loads one (``add_model_args``)."""
    try:
        model, tokenizer = model_from_args(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    config = generation_config(tokenizer, args.max_new_tokens, args.temperature, args.top_p)

    def ask(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
        prompt = chat_prompt(tokenizer, messages, tools, thinking_switch(args))
        if args.seed is not None:
            torch.manual_seed(args.seed)  # as the server does for a request with a seed
        text = "".join(ReplyStream(model, tokenizer, prompt, config))
        return assistant_turn(*split_tool_calls(split_reasoning(text, thinking_open=opens_thinking(prompt))[1]))

    return ask


def remote_ask(args: argparse.Namespace, client: Any = None) -> Ask:
    """Replies from an OpenAI-compatible endpoint (``client``: an ``openai.OpenAI``, made from the flags if None)."""
    client = client or OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        name = args.model or client.models.list().data[0].id
    except APIConnectionError:
        sys.exit(f"error: nothing answered at {client.base_url} (is the server running? --base_url)")
    except APIError as e:
        sys.exit(f"error: {client.base_url} refused to list its models: {e}")
    options = {"seed": args.seed} if args.seed is not None else {}  # only what was asked: servers differ on nulls
    if thinking_switch(args) is not None:
        options["extra_body"] = {"chat_template_kwargs": {"open_thinking": thinking_switch(args)}}

    def ask(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            reply = client.chat.completions.create(
                model=name, messages=messages, tools=tools, temperature=args.temperature, top_p=args.top_p,
                max_tokens=args.max_new_tokens, **options).choices[0].message
        except APIError as e:
            raise ReplyFailed(f"{client.base_url} refused: {e}") from None
        calls = [{"id": call.id, "type": "function",
                  "function": {"name": call.function.name, "arguments": call.function.arguments}}
                 for call in reply.tool_calls or []]
        return assistant_turn(reply.content or "", calls)

    return ask


def thinking_switch(args: argparse.Namespace) -> bool | None:
    return None if args.open_thinking is None else bool(args.open_thinking)


# ----------------------------------------------------------------------------------------------------------------------

def run_benchmark(cases: list[Case], ask: Ask, max_tool_rounds: int, verbose: bool = False) -> list[dict[str, Any]]:
    """Run and print every case, then the totals; returns the records."""
    print(f"{'case':<14}{'  '.join(CRITERIA)}  result  final answer")
    records = []
    for case in cases:
        record = run_case(case, ask, max_tool_rounds)
        records.append(record)
        if verbose:
            print(f"--- {case.id}: {case.prompt}")
            for message in record["transcript"]:
                print(f"    {json.dumps(message, ensure_ascii=False)}")
        marks = "".join(f"{'✓' if record[k] else '✗':<{len(k) + 2}}" for k in CRITERIA)
        final = record.get("error") or (record["transcript"] or [{}])[-1].get("content") or ""
        print(f"{case.id:<14}{marks}{'pass' if record['passed'] else 'FAIL':<8}{final[:60]!r}")
    totals = {k: sum(record[k] for record in records) for k in (*CRITERIA, "passed")}
    print(" · ".join(f"{k} {v}/{len(records)}" for k, v in totals.items()))
    return records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("an OpenAI-compatible endpoint instead of a checkpoint")
    g.add_argument("--base_url", default=None, help="e.g. http://127.0.0.1:8998/v1 (scripts/serve_openai_api.py)")
    g.add_argument("--model", default=None, help="the endpoint's model name (default: the first it lists)")
    g.add_argument("--api_key", default="none")
    g = p.add_argument_group("benchmark")
    g.add_argument("--max_new_tokens", type=int, default=256, help="per reply")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy, repeatable")
    g.add_argument("--top_p", type=float, default=0.85)
    g.add_argument("--seed", type=int, default=None, help="sampling seed for every reply (with --temperature > 0)")
    g.add_argument("--max_tool_rounds", type=int, default=3)
    g.add_argument("--open_thinking", type=int, default=None, choices=[0, 1],
                   help="1: replies start inside a <think> block; 0: behind an empty one; default: the template's")
    g.add_argument("--cases", nargs="+", default=None, metavar="ID", help="run only these cases")
    g.add_argument("--verbose", action="store_true", help="print every case's messages")
    g.add_argument("--out", default=None, help="write the records (transcripts and scores) to this JSON file")
    args = p.parse_args(argv)
    known = {case.id for case in CASES}
    if args.cases and (unknown := [c for c in args.cases if c not in known]):
        p.error(f"unknown case {', '.join(unknown)}; the cases are {', '.join(sorted(known))}")
    if args.max_new_tokens < 1 or args.max_tool_rounds < 0 or args.temperature < 0:
        p.error("--max_new_tokens must be at least 1, --max_tool_rounds and --temperature at least 0")
    return args


def main(argv: list[str] | None = None, client: Any = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    ask = remote_ask(args, client) if args.base_url or client else local_ask(args)
    cases = [case for case in CASES if not args.cases or case.id in args.cases]
    records = run_benchmark(cases, ask, args.max_tool_rounds, args.verbose)
    if args.out:
        Path(args.out).write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return records


if __name__ == "__main__":
    main()
