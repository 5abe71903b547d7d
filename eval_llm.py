"""Chat with a trained model, or run it over eight fixed prompts.  与模型对话，或用八个固定问题自动测试。

    python eval_llm.py --weight full_sft                     # out/full_sft_512.pth; asks: [0] auto test [1] chat
    python eval_llm.py --weight pretrain --mode auto         # a pretrained model continues text (no chat template)
    python eval_llm.py --weight full_sft --lora_weight identity --history_cnt 4     # or --historys 4
    python eval_llm.py --load_from out/full_sft_512-hf       # a transformers folder (scripts/convert_model.py)
    python eval_llm.py --weight ~/Downloads/full_sft_512.pth --tokenizer ~/minimind/model   # MiniMind's weights
    printf '你好\\n/clear\\n1+1=?\\n' | python eval_llm.py --temperature 0    # scripted: prompts from stdin
    python eval_llm.py --weight full_sft --open_thinking 1   # the reply starts inside a <think> block (0: none)
    python eval_llm.py --weight full_sft --tools             # the model may call model/tools.py's tools

In a chat: /clear forgets the history (清空历史), /exit or Ctrl-D quits (退出), Ctrl-C stops a reply (中断回答).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.cli import HelpFormatter
from model.generation import (ReasoningSplit, ReplyStream, chat_prompt, fit_history, generation_config, opens_thinking,
                              plain_prompt)
from model.loading import add_model_args, model_from_args, weight_arg
from model.metrics import CHAT_PROMPTS, PLAIN_PROMPTS, ngram_repetition
from model.tools import TOOLS, Toolbox, assistant_turn, chat_exchange, split_tool_calls

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

    from model.model_minimind import MiniMindForCausalLM

DIM, PLAIN = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")  # a model's thinking is shown dimmed

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    g = p.add_argument_group("generation (生成参数)")
    g.add_argument("--max_new_tokens", type=int, default=2048, help="reply length cap in tokens (MiniMind: 8192)")
    g.add_argument("--temperature", type=float, default=0.85, help="0: greedy (deterministic)")
    g.add_argument("--top_p", type=float, default=0.85)
    g.add_argument("--top_k", type=int, default=0, help="0: off")
    g.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages repeats (e.g. 1.1)")
    g.add_argument("--num_beams", type=int, default=1, help="> 1: beam search (replies then arrive whole)")
    g.add_argument("--seed", type=int, default=None, help="fix the sampling seed (default: a fresh one)")
    c = p.add_argument_group("session (会话)")
    c.add_argument("--mode", choices=["auto", "chat"], default=None,
                   help="auto: the eight fixed prompts; chat: your prompts (default: ask, or chat when stdin is piped)")
    c.add_argument("--history_cnt", "--historys", type=int, default=0,  # --historys: MiniMind's current name
                   help="past messages kept in a chat, as MiniMind counts them: 2 = the last question and answer")
    c.add_argument("--max_context", type=int, default=0,
                   help="sliding window: drop the oldest turns until the prompt fits this many tokens (0: off)")
    c.add_argument("--plain", action="store_true", help="continue text without the chat template (auto for pretrain)")
    c.add_argument("--show_speed", type=int, default=1, choices=[0, 1], help="print tokens/s after each reply")
    c.add_argument("--open_thinking", type=int, default=None, choices=[0, 1],
                   help="1: the reply starts inside a <think> block; 0: behind an empty one (answer directly); "
                        "default: as the chat template decides (ours: the model does)")
    c.add_argument("--tools", nargs="*", default=None, metavar="NAME",
                   help=f"let the model call tools (all, or those named: {', '.join(t.name for t in TOOLS)}); "
                        "their answers come back as tool turns")
    c.add_argument("--max_tool_rounds", type=int, default=3, help="rounds of tool calls per prompt, at most")
    args = p.parse_args(argv)
    if args.history_cnt < 0 or args.history_cnt % 2:
        p.error("--history_cnt counts messages, a question and its answer being 2: use 0, 2, 4, ...")
    if args.tools is not None:
        try:
            args.tools = Toolbox(args.tools or None)
        except ValueError as e:
            p.error(str(e))
    if args.max_new_tokens < 1 or args.num_beams < 1 or args.max_tool_rounds < 0:
        p.error("--max_new_tokens and --num_beams must be at least 1, --max_tool_rounds at least 0")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.repetition_penalty <= 0:
        p.error("sampling needs --temperature >= 0, --top_k >= 0 (0: off), 0 < --top_p <= 1, --repetition_penalty > 0")
    return args


def read_prompts(interactive: bool) -> Iterator[str]:
    """Lines typed at the terminal, or lines of piped stdin (echoed, so the transcript reads like a chat)."""
    if not interactive:
        try:
            for line in sys.stdin:
                if line.strip():
                    print(f"👶: {line.strip()}")
                    yield line.strip()
        except KeyboardInterrupt:  # Ctrl-C while a script feeds us: stop quietly
            pass
        return
    while True:
        try:
            text = input("👶: ").strip()
        except EOFError:  # Ctrl-D
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in Python's REPL
            print()
            continue
        if text:
            yield text


def respond(model: MiniMindForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, config: GenerationConfig,
            show_speed: bool, thinking_open: bool = False) -> str | None:
    """Stream one reply to stdout and return its answer (a ``<think>`` block is shown dimmed, and left out of what
    is returned, so of the history); None when Ctrl-C cut it short. ``thinking_open``: the prompt opened the
    ``<think>`` block."""
    stream = ReplyStream(model, tokenizer, prompt, config)
    pieces, split = iter(stream), ReasoningSplit(thinking_open)
    answer, thinking = "", False
    print("🤖: ", end="", flush=True)
    try:
        for piece in itertools.chain(pieces, [None]):  # None: the end, when held-back text is let out
            thought, said = split.feed(piece or "", done=piece is None)
            if thought:
                print(("" if thinking else f"{DIM}(thinking) ") + thought, end="", flush=True)
                thinking = True
            if said:
                print((f"{PLAIN}\n" if thinking else "") + said, end="", flush=True)
                answer, thinking = answer + said, False
    except KeyboardInterrupt:
        print(f"{PLAIN} [interrupted / 已中断]")
        return None
    finally:
        pieces.close()  # stops generation now if the loop was left early
    print(PLAIN if thinking else "")
    if thinking and stream.finish_reason == "length":
        print(f"[the reply ended while still thinking: raise --max_new_tokens (now {config.max_new_tokens})]")
    if show_speed:
        print(f"[{stream.completion_tokens} tokens, {stream.tokens_per_second:.1f} tokens/s]")
    return answer


def converse(model: MiniMindForCausalLM, tokenizer: PreTrainedTokenizerBase, config: GenerationConfig,
             messages: list[dict], args: argparse.Namespace, plain: bool = False) -> list[dict] | None:
    """The new messages answering ``messages``, printed as they come: the reply, or with ``args.tools`` the replies
    that call tools, the tools' answers (tool turns) and the final reply. ``plain``: a pretrained model continues the
    last message as text, without the chat template. None when Ctrl-C cut it short."""
    if plain:
        reply = respond(model, tokenizer, plain_prompt(tokenizer, messages[-1]["content"]), config, bool(args.show_speed))
        return None if reply is None else [assistant_turn(reply, [])]
    tools, thinking = args.tools, None if args.open_thinking is None else bool(args.open_thinking)

    def ask(history: list[dict]) -> dict | None:
        prompt = chat_prompt(tokenizer, history, tools and tools.schemas(), thinking)
        answer = respond(model, tokenizer, prompt, config, bool(args.show_speed), opens_thinking(prompt))
        if answer is None:
            return None
        return assistant_turn(*split_tool_calls(answer)) if tools else assistant_turn(answer, [])

    return chat_exchange(ask, messages, tools, args.max_tool_rounds)


def run_auto(model: MiniMindForCausalLM, tokenizer: PreTrainedTokenizerBase, config: GenerationConfig, plain: bool,
             args: argparse.Namespace) -> None:
    """Reply to the eight fixed prompts, then print the replies' mean length and 4-gram repetition."""
    replies = []
    for text in PLAIN_PROMPTS if plain else CHAT_PROMPTS:
        print(f"👶: {text}")
        new = converse(model, tokenizer, config, [{"role": "user", "content": text}], args, plain)
        replies.append((new[-1]["content"] or "") if new else "")
        print()
    mean_len = sum(map(len, replies)) / len(replies)
    mean_rep = sum(ngram_repetition(r) for r in replies) / len(replies)
    print(f"mean reply length {mean_len:.1f} characters, mean 4-gram repetition {mean_rep:.3f} (characters)")


def run_chat(model: MiniMindForCausalLM, tokenizer: PreTrainedTokenizerBase, config: GenerationConfig, plain: bool,
             args: argparse.Namespace) -> None:
    """Reply to prompts from the terminal or stdin, keeping the last ``args.history_cnt`` messages (a plain model
    sees only the current line)."""
    history_cnt, max_context = args.history_cnt, args.max_context
    print("/clear: forget the history 清空历史 · /exit or Ctrl-D: quit 退出 · Ctrl-C: stop a reply 中断回答",
          file=sys.stderr)
    messages: list[dict] = []
    for text in read_prompts(sys.stdin.isatty()):
        if text == "/exit":
            break
        if text == "/clear":
            messages = []
            print("(history cleared / 历史已清空)")
            continue
        messages = messages[-history_cnt:] if history_cnt else []
        messages.append({"role": "user", "content": text})
        if max_context and not plain:
            messages = fit_history(tokenizer, messages, max_context)
        new = converse(model, tokenizer, config, messages, args, plain)
        if new is None:
            messages.pop()  # an interrupted turn is not part of the history
        else:
            messages += new


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        model, tokenizer = model_from_args(args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    plain = args.plain or Path(weight_arg(args)).name.startswith("pretrain")  # a pretrained model knows no chat
    print(f"{model.params_summary()} | {model.device} {str(model.dtype).removeprefix('torch.')} | "
          f"{'plain continuation' if plain else 'chat'}", file=sys.stderr)
    config = generation_config(tokenizer, args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                               args.repetition_penalty, args.num_beams)
    mode = args.mode
    if mode is None:  # piped stdin holds the prompts, so only a terminal is asked
        mode = "chat" if not sys.stdin.isatty() else (
            "auto" if input("[0] 自动测试 auto test\n[1] 手动对话 chat\n> ").strip() == "0" else "chat")
    if mode == "auto":
        run_auto(model, tokenizer, config, plain, args)
    else:
        run_chat(model, tokenizer, config, plain, args)


if __name__ == "__main__":
    main()
