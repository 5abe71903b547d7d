"""The rollout phase the RL stages share: prompts -> sampled replies -> rewards -> the tensors their losses need.

    rollout = Rollout(tokenizer, RolloutSettings.from_args(args), rewards, reward_model)
    batch = rollout.sample(policy, rows, step, rt)          # input_ids, attention_mask, reply_mask, reward/*
    batch["old_logps"] = reply_logps(model, batch, T)[0]    # under no_grad and rt.autocast(), as training computes it

Sampling runs HF ``generate`` (KV cache) in eval mode. Each reply has its own random generator, seeded from (seed,
step, the prompt's row in the file, the reply's number): a reply does not depend on the rank or the batch its prompt
lands in, and a resumed run samples what an uninterrupted one does. Rewards are scored right after sampling, before
any policy or reference forward (a reward model then never shares memory with their activations).

On CUDA a static (preallocated) KV cache may sample faster; it is not measured here (no GPU), so generate uses
transformers' default dynamic cache.
"""

from __future__ import annotations

import copy
import json
import random
from argparse import ArgumentParser, Namespace
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dataset import resolve_data_path
from dataset.rl_dataset import RLPromptDataset
from model.generation import chat_prompt, pad_rows, sample_replies, stop_token_ids
from model.loading import load_tokenizer
from trainer.args import build_parser, fail
from trainer.rewards import REWARDS, Reply, RewardFn, RewardModel, parse_rewards, score
from trainer.runtime import Runtime, all_ranks
from trainer.stage import Batch, stage_weights_path

Row = dict[str, Any]  # a prompt row of dataset.rl_dataset: index, messages, tools, gt


@dataclass
class RolloutSettings:
    num_generations: int  # replies per prompt
    max_gen_len: int  # new tokens per reply at most
    max_prompt_len: int  # prompt tokens at most (--max_seq_len); longer prompts keep their end, and are counted
    temperature: float
    thinking_ratio: float  # share of prompts whose generation prompt opens a think block
    seed: int

    @classmethod
    def from_args(cls, args: Namespace) -> RolloutSettings:
        return cls(args.num_generations, args.max_gen_len, args.max_seq_len, args.temperature, args.thinking_ratio,
                   args.seed)


def reply_seed(seed: int, step: int, row: int, reply: int, *more: int) -> int:
    """A 63-bit seed that depends on all the numbers (and nothing else): the run's seed, the step, the prompt's row,
    the reply's number, and e.g. the turn of a tool episode."""
    return int(np.random.SeedSequence([seed, step, row, reply, *more]).generate_state(2, np.uint64)[0]
               >> np.uint64(1))


def generation_prompt(tokenizer: Any, row: Row, think: bool) -> str:
    """The chat up to an open assistant turn; with ``think`` the turn opens a live think block (the template's
    ``open_thinking``); without, the template's default prompt."""
    return chat_prompt(tokenizer, row["messages"], row.get("tools"), open_thinking=True if think else None)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, rows: int = 2) \
        -> torch.Tensor:
    """log softmax(logits / temperature) at ``targets`` ([N, R, V] logits, [N, R] targets -> [N, R] float32), ``rows``
    replies at a time: the float32 copies of the logits (scaled, exponentiated, their gradient) exist for one chunk at
    a time, and with grad on each chunk is recomputed in the backward pass instead of kept. Every row's numbers are
    those of the one-piece computation, to the bit."""
    def chunk(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scaled = logits.float() / temperature
        return scaled.gather(-1, targets[..., None]).squeeze(-1) - scaled.logsumexp(-1)
    grad = torch.is_grad_enabled() and logits.requires_grad
    return torch.cat([checkpoint(chunk, l, t, use_reentrant=False) if grad else chunk(l, t)
                      for l, t in zip(logits.split(rows), targets.split(rows))])


def reply_logps(model: nn.Module, batch: Batch, temperature: float = 1.0) \
        -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per reply token, its log-probability under ``model`` at ``temperature`` ([N, R], float32), and the MoE
    balancing loss. The one forward the old, reference and training log-probs all use: called under the same autocast,
    they agree to the bit for the same weights."""
    reply_len = batch["reply_mask"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=reply_len + 1)
    # the logits at t score the token at t+1
    return token_logps(out.logits[:, :-1], batch["input_ids"][:, -reply_len:], temperature), out.aux_loss


def masked_mean(values: torch.Tensor, mask: torch.Tensor, per_sequence: bool = True) -> torch.Tensor:
    """Mean over masked-in tokens: per sequence, then over sequences (MiniMind's GRPO), or over all tokens at once
    (``per_sequence=False``: DAPO / Dr. GRPO's token-level mean, where a long reply counts by its length)."""
    mask = mask.to(values.dtype)
    if per_sequence:
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    return (values * mask).sum() / mask.sum().clamp(min=1)


def rewards_total(batch: Batch) -> torch.Tensor:
    """The sum of a rollout batch's reward components ([N])."""
    return sum(v for k, v in batch.items() if k.startswith("reward/"))


def reward_metrics(batch: Batch) -> dict[str, torch.Tensor]:
    """What every RL stage logs about its rollouts: the mean reward and each component, reply length, stopped share."""
    metrics = {k: v.float().mean() for k, v in batch.items() if k.startswith("reward/")}
    metrics["reward"] = rewards_total(batch).float().nanmean()
    metrics["reply_tokens"] = batch["reply_mask"].sum(-1).float().mean()
    metrics["finished"] = batch["finished"].float().mean()
    metrics["prompt_truncated"] = batch["prompt_truncated"].float().mean()
    if "tool_calls" in batch:  # tool episodes: calls made per episode
        metrics["tool_calls"] = batch["tool_calls"].float().mean()
    return metrics


class RewardLog:
    """One line per step, rank 0 writing: the step's mean reward and each component over all ranks, in a jsonl file
    beside the weights (``out/grpo_512_rewards.jsonl``) that scripts/plot_rewards.py draws. A resumed run drops the
    lines from its resume step on, then appends: the file tells one run's story."""

    def __init__(self, path: Path):
        self.path, self.started = path, False

    def write(self, step: int, batches: list[Batch], rt: Runtime) -> None:
        names = sorted(k for k in batches[0] if k.startswith("reward/"))
        totals = [torch.nan_to_num(rewards_total(b).float()) for b in batches]
        values = [sum(t.sum() for t in totals), sum(len(t) for t in totals)]
        values += [sum(b[k].float().nan_to_num().sum() for b in batches) for k in names]
        sums = all_ranks(rt, torch.tensor([float(v) for v in values], device=rt.device)).tolist()
        if not rt.is_main:
            return
        if not self.started:  # this run's first line: keep earlier steps' lines only (those of a resumed run)
            lines = self.path.read_text().splitlines() if self.path.is_file() else []
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] <= step))
            self.started = True
        record = {"step": step + 1, "reward": sums[0] / sums[1],
                  **{k: v / sums[1] for k, v in zip(names, sums[2:])}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class Rollout:
    """Prompt rows -> sampled, scored replies as tensors (``sample``), with the flags' settings and rewards."""

    def __init__(self, tokenizer: Any, settings: RolloutSettings, rewards: dict[str, RewardFn],
                 reward_model: Callable[[list[Reply]], list[float]] | None = None):
        self.tokenizer, self.settings, self.rewards, self.reward_model = tokenizer, settings, rewards, reward_model
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[-1]

    @classmethod
    def from_args(cls, args: Namespace, tokenizer: Any, device: torch.device) -> Rollout:
        """The rollout the flags describe; a --reward_model_path is loaded here, once (a bad folder: one line)."""
        reward_model = RewardModel(args.reward_model_path, args.reward_device or device,
                                   getattr(torch, args.reward_dtype)) if args.reward_model_path else None
        return cls(tokenizer, RolloutSettings.from_args(args), parse_rewards(args.rewards), reward_model)

    def prompt(self, row: Row, step: int) -> tuple[list[int], bool, bool]:
        """A row's prompt tokens (their end, at most --max_seq_len), whether its generation prompt opens a think block
        (drawn per prompt and step), and whether it was cut."""
        s = self.settings
        think = random.Random(reply_seed(s.seed, step, row["index"], s.num_generations)).random() < s.thinking_ratio
        tokens = self.tokenizer(generation_prompt(self.tokenizer, row, think), add_special_tokens=False).input_ids
        return tokens[-s.max_prompt_len:], think, len(tokens) > s.max_prompt_len  # the end: question, open turn

    @torch.no_grad()
    def generate(self, policy: nn.Module, contexts: list[list[int]], seeds: list[int], rt: Runtime) \
            -> tuple[list[list[int]], list[bool]]:
        """One sampled reply to each context (a token list) at once, each from its own seed: its tokens up to and
        including its first stop token (at most --max_gen_len), and whether it has one."""
        generators = [torch.Generator(rt.device).manual_seed(seed) for seed in seeds]
        with rt.autocast():
            sampled = sample_replies(policy, contexts, generators, self.settings.max_gen_len,
                                     self.settings.temperature, self.stop_ids, self.pad_id)
        return ([r[m.bool()].tolist() for r, m in zip(sampled.replies, sampled.reply_mask)],
                sampled.finished.tolist())

    def sample(self, policy: nn.Module, rows: list[Row], step: int, rt: Runtime) -> Batch:
        """``num_generations`` replies to each prompt of ``rows``, scored, as ``batch`` lays them out."""
        n = self.settings.num_generations
        prompts = [self.prompt(row, step) for row in rows]
        seeds = [reply_seed(self.settings.seed, step, row["index"], j) for row in rows for j in range(n)]
        contexts = [tokens for tokens, _, _ in prompts for _ in range(n)]
        replies, finished = self.generate(policy, contexts, seeds, rt)
        texts = self.tokenizer.batch_decode(replies, skip_special_tokens=True)
        scored = score([Reply(text, done, row) for text, done, row in
                        zip(texts, finished, (row for row in rows for _ in range(n)))], self.rewards,
                       self.reward_model)
        return self.batch(contexts, replies, [[1] * len(r) for r in replies], finished,
                          [cut for _, _, cut in prompts for _ in range(n)], scored, rt)

    def batch(self, prompts: list[list[int]], completions: list[list[int]], trained: list[list[int]],
              finished: list[bool], truncated: list[bool], scored: dict[str, torch.Tensor], rt: Runtime) -> Batch:
        """The tensors the losses read (all [N] or [N, T], N = rows x generations, a prompt's replies next to each
        other): input_ids = left-padded prompt + completion (padded after it), attention_mask, reply_mask (1 on the
        completion's tokens the policy wrote and is trained on: up to and including its first stop token; 0 on a tool
        episode's tool turns), finished, prompt_truncated, and reward/<name> per component."""
        prompt_ids, prompt_mask = pad_rows(prompts, self.pad_id, left=True)
        completion_ids, completion_mask = pad_rows(completions, self.pad_id)
        batch = {"input_ids": torch.cat([prompt_ids, completion_ids], 1),
                 "attention_mask": torch.cat([prompt_mask, completion_mask], 1),
                 "reply_mask": pad_rows(trained, 0)[0], "finished": torch.tensor(finished),
                 "prompt_truncated": torch.tensor(truncated), **{f"reward/{k}": v for k, v in scored.items()}}
        return {k: v.to(rt.device) for k, v in batch.items()}


class RLStage:
    """What the RL stages share: the policy (trained in place), its frozen reference, the rollout and the reward log,
    made in ``setup``: after --from_weight and before --from_resume, so the reference is the starting model even when
    a run resumes."""

    rollout_class = Rollout  # how prompts become scored replies (the agent stage: tool episodes)

    def __init__(self, args: Namespace):
        self.args = args
        self.policy: nn.Module | None = None  # the plain module, for sampling
        self.reference: nn.Module | None = None
        self.rollouts: Rollout | None = None
        self.reward_log: RewardLog | None = None

    def setup(self, model: nn.Module, args: Namespace) -> None:
        self.policy = model
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        self.rollouts = self.rollout_class.from_args(args, load_tokenizer(), next(model.parameters()).device)
        weights = stage_weights_path(args, model.config)
        self.reward_log = RewardLog(weights.with_name(f"{weights.stem}_rewards.jsonl"))


def rl_file(args: Namespace) -> Path:
    return resolve_data_path(args.data_path, ["rlaif.jsonl", "rlaif-mini.jsonl"], "rl.jsonl")


def rl_data(args: Namespace, tokenizer) -> RLPromptDataset:
    return RLPromptDataset(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                           cache_dir=args.cache_dir)


def rl_parser(description: str, save_weight: str, project: str, num_generations: int) -> ArgumentParser:
    """The shared flags with MiniMind's RL defaults, and those of sampling and scoring (MiniMind's names)."""
    parser = build_parser(description, epochs=1, batch_size=2, learning_rate=3e-7, max_seq_len=768, save_interval=10,
                          log_interval=1, eval_size=0, from_weight="full_sft", save_weight=save_weight,
                          wandb_project=project)
    g = parser.add_argument_group("rollout and rewards")
    g.add_argument("--num_generations", type=int, default=num_generations, help="replies sampled per prompt")
    g.add_argument("--max_gen_len", type=int, default=1024, help="new tokens per reply at most (--max_seq_len: the "
                   "prompt's tokens at most; longer prompts keep their end and are counted)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use it too)")
    g.add_argument("--thinking_ratio", type=float, default=0.9,
                   help="share of prompts whose reply starts inside an open <think> block")
    g.add_argument("--rewards", default="length,think,repetition,answer",
                   help=f"comma-separated rule rewards of {', '.join(REWARDS)} (see trainer/rewards.py)")
    g.add_argument("--reward_model_path", default=None, help="a local transformers reward model folder (one-label "
                   "sequence classifier, or InternLM2-reward style); none by default")
    g.add_argument("--reward_device", default=None, help="where the reward model runs (default: the policy's device)")
    g.add_argument("--reward_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def check_rl_args(args: Namespace) -> None:
    if args.eval_size:  # a note, not an error: speedrun.sh passes its flags to every stage
        print(f"[rl] --eval_size {args.eval_size} ignored: RL stages have no held-out loss (evaluate with eval_llm.py)")
        args.eval_size = 0
    if args.temperature <= 0:
        fail("--temperature must be positive: RL learns from the spread of sampled replies")
    try:
        parse_rewards(args.rewards)
    except ValueError as e:
        fail(f"--rewards: {e}")
