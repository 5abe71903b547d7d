"""Chat with scripts/serve_openai_api.py through the official ``openai`` client, streamed.  用 openai 客户端对话。

    python scripts/serve_openai_api.py --weight full_sft      # in one terminal
    python scripts/chat_openai_api.py                         # in another

    python scripts/chat_openai_api.py --tools --open_thinking 1   # tools run here, on this machine; thinking on

As in eval_llm.py: /clear forgets the history, /exit or Ctrl-D quits, Ctrl-C stops a reply. A failed request (the
server refused it, or is not running) prints a one-line error and the chat goes on. With ``--tools`` the server
returns the model's calls (``tool_calls``, OpenAI's way) and this client runs them (model/tools.py, no torch needed)
and sends their answers back, up to ``--max_tool_rounds`` times.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

from openai import APIConnectionError, APIError, OpenAI

from model.cli import HelpFormatter
from model.tools import TOOLS, Toolbox, assistant_turn, chat_exchange


# A reasoning model's thinking is shown dimmed (on a terminal), and kept out of the history.
DIM, PLAIN = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")


def reply(client: OpenAI, args: argparse.Namespace, messages: list[dict[str, Any]], tools: list[dict] | None = None,
          thinking: bool | None = None) -> dict[str, Any] | None:
    """Stream one reply to stdout and return it as an assistant message (its calls in ``tool_calls``; the thinking,
    shown dimmed, stays out); None when it failed (the error is printed) or Ctrl-C cut it short. ``thinking``: the
    server's thinking switch (None: the server's default)."""
    print("🤖: ", end="", flush=True)
    text, thinking_shown, calls = "", False, {}
    switch = None if thinking is None else {"chat_template_kwargs": {"open_thinking": thinking}}
    try:
        stream = client.chat.completions.create(model=args.model, messages=messages, stream=True,
                                                temperature=args.temperature, max_tokens=args.max_tokens,
                                                extra_body=switch, **({"tools": tools} if tools else {}))
        with stream:  # leaving early closes the connection: the server stops generating
            for chunk in stream:
                delta = chunk.choices[0].delta if chunk.choices else None  # a usage-only chunk has none
                if thought := getattr(delta, "reasoning_content", None):
                    print(("" if thinking_shown else f"{DIM}(thinking) ") + thought, end="", flush=True)
                    thinking_shown = True
                if piece := delta and delta.content:
                    print((f"{PLAIN}\n" if thinking_shown else "") + piece, end="", flush=True)
                    text, thinking_shown = text + piece, False
                for part in (delta and delta.tool_calls) or []:  # a call may come in pieces (vLLM streams them)
                    call = calls.setdefault(part.index, {"id": "", "type": "function",
                                                         "function": {"name": "", "arguments": ""}})
                    call["id"] += part.id or ""
                    call["function"]["name"] += part.function and part.function.name or ""
                    call["function"]["arguments"] += part.function and part.function.arguments or ""
    except KeyboardInterrupt:
        print(f"{PLAIN} [interrupted]")
        return None
    except APIConnectionError as e:  # its message is only "Connection error." (or "Request timed out.")
        print(f"{PLAIN}\nerror: {e} Nothing answered at {client.base_url}: is scripts/serve_openai_api.py running "
              "there? (--base_url)")
        return None
    except APIError as e:
        print(f"{PLAIN}\nerror: {e}")
        return None
    print(PLAIN if thinking_shown else "")
    for call in calls.values():
        print(f"📞 {call['function']['name']}({call['function']['arguments']})")
    return assistant_turn(text, [calls[i] for i in sorted(calls)])


def prompts() -> Iterator[str]:
    """Typed lines; piped lines are echoed, so the transcript reads like a chat. Ends at EOF, Ctrl-D or Ctrl-C."""
    typed = sys.stdin.isatty()
    while True:
        try:
            text = input("👶: " if typed else "").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text and not typed:
            print(f"👶: {text}")
        if text:
            yield text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--base_url", default="http://127.0.0.1:8998/v1")
    p.add_argument("--model", default="minimind")
    p.add_argument("--temperature", type=float, default=0.85)
    p.add_argument("--max_tokens", type=int, default=512)
    p.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY", "none"),
                   help="the server's --api_key (default: $MINIMIND_API_KEY)")
    p.add_argument("--history_cnt", type=int, default=0, help="past messages sent along (2 = last question + answer)")
    p.add_argument("--open_thinking", type=int, default=None, choices=[0, 1],
                   help="1: the reply starts inside a <think> block; 0: behind an empty one; default: the server's")
    p.add_argument("--tools", nargs="*", default=None, metavar="NAME",
                   help=f"offer tools, run here (all, or those named: {', '.join(t.name for t in TOOLS)})")
    p.add_argument("--max_tool_rounds", type=int, default=3, help="rounds of tool calls per prompt, at most")
    args = p.parse_args()
    if args.history_cnt < 0 or args.history_cnt % 2:
        p.error("--history_cnt counts messages, a question and its answer being 2: use 0, 2, 4, ...")
    try:
        toolbox = None if args.tools is None else Toolbox(args.tools or None)
    except ValueError as e:
        p.error(str(e))
    thinking = None if args.open_thinking is None else bool(args.open_thinking)
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)  # "none": a server without a key ignores it
    messages: list[dict[str, Any]] = []
    for text in prompts():
        if text == "/exit":
            return
        if text == "/clear":
            messages = []
            print("(history cleared / 历史已清空)")
            continue
        messages = (messages[-args.history_cnt:] if args.history_cnt else []) + [{"role": "user", "content": text}]
        new = chat_exchange(lambda history: reply(client, args, history, toolbox and toolbox.schemas(), thinking),
                            messages, toolbox, args.max_tool_rounds)
        if new is None:
            messages.pop()  # a failed or interrupted turn is not part of the history
        else:
            messages += new


if __name__ == "__main__":
    main()
