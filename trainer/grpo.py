"""The GRPO / CISPO objective, shared by the GRPO stage (trainer/train_grpo.py: one reply per sample) and the agent
stage (trainer/train_agent.py: multi-turn tool episodes). trainer/train_grpo.py's docstring states the maths.

    add_grpo_args(parser)                                # beside trainer/rollout.py's rl_parser flags
    check_grpo_args(args)
    run(GRPO(args).stage("grpo", rl_data), args)
"""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dataset.rl_dataset import rows_collate
from trainer.args import fail
from trainer.rollout import RLStage, check_rl_args, masked_mean, reply_logps, reward_metrics, rewards_total
from trainer.runtime import Runtime
from trainer.stage import Batch, Stage


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(r − group mean) / (group std + eps) for rewards laid out group by group ([N], N = groups × group_size; std
    unbiased, as MiniMind's), and the number of NaN/inf rewards: those replies are skipped (advantage 0, left out of
    their group's mean and std)."""
    grouped = rewards.view(-1, group_size)
    valid = torch.isfinite(grouped)
    count = valid.sum(-1, keepdim=True)
    mean = torch.where(valid, grouped, 0).sum(-1, keepdim=True) / count.clamp(min=1)
    var = (torch.where(valid, grouped - mean, 0) ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    advantages = torch.where(valid, (grouped - mean) / (var.sqrt() + eps), 0)
    return advantages.flatten(), (~valid).sum()


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per token, the k3 estimate of KL(π ‖ ref): exp(ref − π) − (ref − π) − 1 (≥ 0; 0 where π = ref)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, advantages: torch.Tensor,
                    loss_type: str = "cispo", epsilon: float = 0.2, epsilon_high: float = 5.0, beta: float = 0.1) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per reply token ([N, R]): the loss (module docstring), the ratio π/π_old, and the k3 KL."""
    ratio = torch.exp(logps - old_logps)
    a = advantages[:, None]
    if loss_type == "cispo":
        policy = ratio.clamp(max=epsilon_high).detach() * a * logps
    else:
        policy = torch.min(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)
    kl = k3_kl(logps, ref_logps)
    return -(policy - beta * kl), ratio, kl


class GRPO(RLStage):
    """The stage: RLStage's policy, reference and rollout, and the GRPO / CISPO loss."""

    def __init__(self, args: Namespace):
        super().__init__(args)
        self.per_sequence = args.loss_agg == "sequence"

    def rollout(self, model: nn.Module, rows: list[list[dict[str, Any]]], step: int, rt: Runtime) \
            -> Iterator[list[Batch]]:
        """One optimizer step on the scored replies to each micro-batch of prompts."""
        batches = []
        for prompts in rows:
            batch = self.rollouts.sample(self.policy, prompts, step, rt)  # rewards first, then the forwards
            batch["advantages"], batch["reward_skipped"] = group_advantages(rewards_total(batch),
                                                                            self.args.num_generations)
            with torch.no_grad(), rt.autocast():
                batch["old_logps"] = reply_logps(model, batch, self.args.temperature)[0]
                batch["ref_logps"] = reply_logps(self.reference, batch, self.args.temperature)[0]
            batches.append(batch)
        self.reward_log.write(step, batches, rt)
        yield batches

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = self.args
        logps, aux_loss = reply_logps(model, batch, a.temperature)
        per_token, ratio, kl = grpo_token_loss(logps, batch["old_logps"], batch["ref_logps"], batch["advantages"],
                                               a.loss_type, a.epsilon, a.epsilon_high, a.beta)
        mask = batch["reply_mask"]
        loss = masked_mean(per_token, mask, self.per_sequence)
        clipped = (ratio > a.epsilon_high) if a.loss_type == "cispo" else ((ratio - 1).abs() > a.epsilon)
        metrics = {**reward_metrics(batch), "kl": masked_mean(kl.detach(), mask, self.per_sequence),
                   "clip_frac": masked_mean(clipped.float(), mask, self.per_sequence),
                   "reward_skipped": batch["reward_skipped"].float()}
        if aux_loss is not None:  # MoE: keep the experts balanced
            loss, metrics["aux_loss"] = loss + aux_loss, aux_loss
        return loss, metrics

    def loss_weight(self, batch: Batch) -> float:
        """What the loss is a mean over: replies, or with --loss_agg token, reply tokens."""
        return float(len(batch["reply_mask"]) if self.per_sequence else batch["reply_mask"].sum())

    def stage(self, name: str, build_dataset: Callable[[Namespace, Any], Any]) -> Stage:
        """The engine's Stage for this objective: prompt rows in, one optimizer step on their scored replies."""
        return Stage(name, build_dataset, loss_fn=self, loss_weight=self.loss_weight, setup=self.setup,
                     collate=rows_collate, rollout=self.rollout)


def add_grpo_args(parser: ArgumentParser) -> None:
    """The objective's flags (MiniMind's names and defaults)."""
    g = parser.add_argument_group("GRPO / CISPO objective")
    g.add_argument("--beta", type=float, default=0.1, help="weight of the k3 KL to the reference")
    g.add_argument("--loss_type", default="cispo", choices=["cispo", "grpo"])
    g.add_argument("--epsilon", type=float, default=0.2, help="GRPO: clip the ratio to [1-ε, 1+ε]")
    g.add_argument("--epsilon_high", type=float, default=5.0, help="CISPO: clip the (detached) ratio above")
    g.add_argument("--loss_agg", default="sequence", choices=["sequence", "token"],
                   help="sequence: mean over each reply's tokens, then over replies (MiniMind); token: one mean over "
                        "all reply tokens (DAPO / Dr. GRPO)")


def check_grpo_args(args: Namespace) -> None:
    check_rl_args(args)
    if args.num_generations < 2:
        fail("--num_generations must be at least 2: a group of one has no spread to learn from")
