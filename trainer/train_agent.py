"""Stage 4, agentic RL (MiniMind's train_agent.py): GRPO or CISPO over multi-turn tool episodes.

Per prompt (a system turn offering tools, a question, and "gt": the facts its answer must state, one per call it
needs), --num_generations episodes are sampled. In an episode the policy replies; the <tool_call>s of its reply run
(model/tools.py: the tools, parser and executor the chat and scripts/eval_toolcall.py use; a bad call gets an error
answer), their answers come back as tool turns and the policy replies again, up to --max_turns replies. An episode is
trained as one sequence: the policy's replies are in the loss, the tool turns (and the template's tokens around them)
are context only, masked out. Each episode is scored (trainer/rewards.py: tool_format, tool_count, tool_answer,
finish, and for episodes without calls length and think; repetition; the total clipped to ±3, the clipping logged as
reward/clip), then trained on exactly as GRPO trains a reply (advantages within the prompt's group, the same loss:
trainer/train_grpo.py's docstring).

    python trainer/train_agent.py --from_weight full_sft_tools   # after the tool SFT below; no data or no GPU: demo
    python trainer/train_agent.py --data_path dataset/agent_rl.jsonl        # MiniMind's data, from its full_sft
    python scripts/eval_toolcall.py --weight agent                          # score the result

The demo's tool SFT: python trainer/train_full_sft.py --data_path dataset/demo/sft_tools.jsonl --from_weight full_sft
--save_weight full_sft_tools --max_seq_len 1024. MiniMind's agent_rl.jsonl also offers tools model/tools.py lacks
(weather, exchange rates, translation): a call to one is answered with an "unknown tool" error.
"""

from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataset import resolve_data_path
from model.generation import chat_prompt, split_reasoning
from model.tools import Toolbox, assistant_turn, split_tool_calls
from trainer import Stage, parse_args, run
from trainer.args import fail
from trainer.grpo import GRPO, add_grpo_args, check_grpo_args
from trainer.rewards import Reply, clip_total, score
from trainer.rollout import Rollout, Row, reply_seed, rl_data, rl_parser
from trainer.runtime import Runtime
from trainer.stage import Batch

# "now" for get_current_time: fixed, so a run (and its resume) samples the same episodes; MiniMind's mock time data
# (2025-03-07 14:30 in Shanghai), so its agent_rl.jsonl's time facts hold
CLOCK = datetime(2025, 3, 7, 6, 30, tzinfo=timezone.utc)
REWARD_LIMIT = 3.0  # MiniMind's clip of an episode's total reward
TURN_END = "<|im_end|>"


def row_toolbox(row: Row) -> Toolbox:
    """The tools the row's system turn offers, those model/tools.py has (a call to another is an unknown tool)."""
    offered = {(spec.get("function") or spec).get("name") for spec in row.get("tools") or [] if isinstance(spec, dict)}
    return Toolbox([name for name in Toolbox().tools if name in offered], clock=lambda: CLOCK)


def tool_turns_tokens(tokenizer: Any, tool_turns: list[dict[str, Any]], think: bool) -> list[int]:
    """The tokens that follow a reply's <|im_end|> when its calls are answered: the tool turns as the chat template
    renders them, then the next assistant turn opened (with a live think block when the episode's prompt opened one).
    Appended to the sampled tokens, never re-tokenising them: the episode trains on exactly what was sampled."""
    text = chat_prompt(tokenizer, [{"role": "assistant", "content": ""}, *tool_turns], open_thinking=True if think
                       else None)
    return tokenizer(text[text.index(TURN_END) + len(TURN_END):], add_special_tokens=False).input_ids


@dataclass
class Episode:
    row: Row
    number: int  # the episode's number among its prompt's --num_generations
    prompt: list[int]
    think: bool  # the prompt (and each turn after a tool answer) opens a live think block
    truncated: bool
    toolbox: Toolbox
    completion: list[int] = field(default_factory=list)  # the replies and tool turns after the prompt
    trained: list[int] = field(default_factory=list)  # per completion token: 1 the policy wrote it, 0 a tool turn's
    text: str = ""  # the last reply
    tool_results: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False  # it ended with an answer: a reply that called nothing and stopped
    done: bool = False


class ToolRollout(Rollout):
    """Rollout's sampling, scoring and tensors, for tool episodes: each turn samples one reply for every episode still
    going, all at once, each from its own seed (seed, step, row, episode, turn): an episode does not depend on the
    rank or batch its prompt lands in, and a resumed run samples what an uninterrupted one does."""

    max_turns: int = 3  # replies per episode at most
    max_total_len: int = 2500  # an episode's tokens, prompt included, at most

    @classmethod
    def from_args(cls, args: Namespace, tokenizer: Any, device: torch.device) -> ToolRollout:
        rollout = super().from_args(args, tokenizer, device)
        rollout.max_turns, rollout.max_total_len = args.max_turns, args.max_total_len
        return rollout

    def sample(self, policy: nn.Module, rows: list[Row], step: int, rt: Runtime) -> Batch:
        s = self.settings
        episodes = [Episode(row, j, *self.prompt(row, step), toolbox=row_toolbox(row))
                    for row in rows for j in range(s.num_generations)]
        for turn in range(self.max_turns):
            going = [e for e in episodes if not e.done]
            if not going:
                break
            replies, stopped = self.generate(policy, [e.prompt + e.completion for e in going],
                                             [reply_seed(s.seed, step, e.row["index"], e.number, turn) for e in going],
                                             rt)
            for episode, reply, stop in zip(going, replies, stopped):
                self.take_turn(episode, reply, stop, last_turn=turn == self.max_turns - 1)
        scored = score([Reply(e.text, e.finished, e.row, e.tool_results) for e in episodes], self.rewards,
                       self.reward_model)
        batch = self.batch([e.prompt for e in episodes], [e.completion for e in episodes],
                           [e.trained for e in episodes], [e.finished for e in episodes],
                           [e.truncated for e in episodes], clip_total(scored, REWARD_LIMIT), rt)
        batch["tool_calls"] = torch.tensor([len(e.tool_results) for e in episodes], device=rt.device)
        return batch

    def take_turn(self, episode: Episode, reply: list[int], stopped: bool, last_turn: bool) -> None:
        """Add a sampled reply to its episode, run its calls, and either answer them (the episode goes on) or end it."""
        episode.completion += reply
        episode.trained += [1] * len(reply)
        episode.text = self.tokenizer.decode(reply, skip_special_tokens=True)
        answer = split_reasoning(episode.text, thinking_open=episode.think)[1]
        tool_turns = episode.toolbox.answer(assistant_turn(*split_tool_calls(answer)))
        episode.tool_results += [json.loads(turn["content"]) for turn in tool_turns]
        episode.done = True
        if not tool_turns:
            episode.finished = stopped
            return
        answers = tool_turns_tokens(self.tokenizer, tool_turns, episode.think)
        room = self.max_total_len - len(episode.prompt) - len(episode.completion) - len(answers)
        if stopped and not last_turn and room >= self.settings.max_gen_len:  # else: unfinished, still calling
            episode.completion += answers
            episode.trained += [0] * len(answers)
            episode.done = False


class Agent(GRPO):
    """GRPO / CISPO (trainer/grpo.py) on tool episodes."""
    rollout_class = ToolRollout


def agent_file(args: Namespace) -> Path:
    return resolve_data_path(args.data_path, ["agent_rl.jsonl"], "agent_rl.jsonl")


def parse(argv: list[str] | None = None) -> Namespace:
    parser = rl_parser(__doc__, "agent", "MiniMind-Agent-RL", num_generations=4)
    add_grpo_args(parser)
    g = parser.add_argument_group("tool episodes")
    g.add_argument("--max_turns", type=int, default=3, help="replies per episode at most (the last one's calls are "
                   "not answered: the episode ends unfinished)")
    g.add_argument("--max_total_len", type=int, default=2500, help="tokens per episode at most, prompt and tool "
                   "turns included: no further turn starts without --max_gen_len of room")
    parser.set_defaults(max_seq_len=1024, max_gen_len=768, thinking_ratio=0.1,  # MiniMind's agent defaults
                        rewards="tool_format,tool_count,tool_answer,finish,length,think,repetition")
    # The demo: from the demo's tool SFT (the docstring's command), one prompt x 4 episodes a step on CPU, short
    # replies (a call or a one-line answer), no thinking (the demo rows have none); lr well above MiniMind's 3e-7, as
    # the GRPO demo's, so ~60 steps can move the model.
    args = parse_args(parser, argv, agent_file, demo=dict(
        from_weight="full_sft_tools", batch_size=1, max_gen_len=96, max_seq_len=512, max_total_len=768,
        learning_rate=2e-5, thinking_ratio=0.0, max_steps=60, log_interval=5, save_interval=20))
    check_grpo_args(args)
    if args.max_turns < 1:
        fail("--max_turns must be at least 1")
    if args.max_seq_len + args.max_gen_len > args.max_total_len:
        fail(f"--max_total_len {args.max_total_len} leaves no room for a prompt of --max_seq_len {args.max_seq_len} "
             f"and a reply of --max_gen_len {args.max_gen_len}")
    return args


def agent_stage(args: Namespace) -> Stage:
    return Agent(args).stage("agent", rl_data)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run(agent_stage(args), args)


if __name__ == "__main__":
    main()
