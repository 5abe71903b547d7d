"""Chat with scripts/serve_openai_api.py through the official ``openai`` client, streamed.  用 openai 客户端对话。

    python scripts/serve_openai_api.py --weight full_sft      # in one terminal
    python scripts/chat_openai_api.py                         # in another

As in eval_llm.py: /clear forgets the history, /exit or Ctrl-D quits, Ctrl-C stops a reply. A failed request (the
server refused it, or is not running) prints a one-line error and the chat goes on.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from openai import APIConnectionError, APIError, OpenAI


# A reasoning model's thinking is shown dimmed (on a terminal), and kept out of the history.
DIM, PLAIN = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")


def reply(client: OpenAI, args: argparse.Namespace, messages: list[dict[str, str]]) -> str | None:
    """Stream one reply to stdout; None when it failed (the error is printed) or Ctrl-C cut it short."""
    print("🤖: ", end="", flush=True)
    text, thinking = "", False
    try:
        stream = client.chat.completions.create(model=args.model, messages=messages, stream=True,
                                                temperature=args.temperature, max_tokens=args.max_tokens)
        with stream:  # leaving early closes the connection: the server stops generating
            for chunk in stream:
                delta = chunk.choices[0].delta if chunk.choices else None  # a usage-only chunk has none
                if thought := getattr(delta, "reasoning_content", None):
                    print(("" if thinking else f"{DIM}(thinking) ") + thought, end="", flush=True)
                    thinking = True
                if piece := delta and delta.content:
                    print((f"{PLAIN}\n" if thinking else "") + piece, end="", flush=True)
                    text, thinking = text + piece, False
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
    print(PLAIN if thinking else "")
    return text


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base_url", default="http://127.0.0.1:8998/v1")
    p.add_argument("--model", default="minimind")
    p.add_argument("--temperature", type=float, default=0.85)
    p.add_argument("--max_tokens", type=int, default=512)
    p.add_argument("--api_key", default=os.environ.get("MINIMIND_API_KEY", "none"),
                   help="the server's --api_key (default: $MINIMIND_API_KEY)")
    p.add_argument("--history_cnt", type=int, default=0, help="past messages sent along (2 = last question + answer)")
    args = p.parse_args()
    if args.history_cnt < 0 or args.history_cnt % 2:
        p.error("--history_cnt counts messages, a question and its answer being 2: use 0, 2, 4, ...")
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)  # "none": a server without a key ignores it
    messages: list[dict[str, str]] = []
    for text in prompts():
        if text == "/exit":
            return
        if text == "/clear":
            messages = []
            print("(history cleared / 历史已清空)")
            continue
        messages = (messages[-args.history_cnt:] if args.history_cnt else []) + [{"role": "user", "content": text}]
        answer = reply(client, args, messages)
        if answer is None:
            messages.pop()  # a failed or interrupted turn is not part of the history
        else:
            messages.append({"role": "assistant", "content": answer})


if __name__ == "__main__":
    main()
