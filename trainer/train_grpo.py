"""Stage 4, GRPO (Shao et al. 2024) or CISPO (MiniMax-M1): reinforcement learning from rewards, no critic.

Per prompt, --num_generations replies are sampled and scored (trainer/rewards.py, + an optional reward model). Each
reply's advantage is its reward relative to its group's: A = (r − mean(r_group)) / (std(r_group) + 1e-4) (a group
whose rewards are all equal teaches nothing). Per reply token, with ratio ρ = π/π_old and the k3 estimate of
KL(π ‖ ref), KL = exp(ref − π) − (ref − π) − 1 ≥ 0:

    grpo    loss = −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·KL
    cispo   loss = −sg(min(ρ, ε_high))·A·log π + β·KL          (sg: no gradient through the weight)

averaged over each reply's tokens up to its first stop token, then over replies (MiniMind's), or with
--loss_agg token over all reply tokens of the batch at once (DAPO / Dr. GRPO: long replies count by their length).
π_old is a no-grad forward over the sampled replies made exactly as the training forward (so the first ratio is 1 to
the bit); the reference is a frozen copy of the starting weights.

    python trainer/train_grpo.py                 # after train_full_sft.py (or dpo); no data or no GPU: demo-sized
    python trainer/train_grpo.py --data_path dataset/rlaif.jsonl --reward_model_path out/internlm2-1_8b-reward
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from dataset.rl_dataset import rows_collate
from trainer import Stage, parse_args, run
from trainer.rollout import (RLStage, check_rl_args, masked_mean, reply_logps, reward_metrics,
                             rewards_total, rl_data, rl_file, rl_parser)
from trainer.runtime import Runtime
from trainer.stage import Batch


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


def parse(argv: list[str] | None = None) -> Namespace:
    parser = rl_parser(__doc__, "grpo", "MiniMind-GRPO", num_generations=6)  # a group of 6 replies per prompt
    parser.add_argument("--beta", type=float, default=0.1, help="weight of the k3 KL to the reference")
    parser.add_argument("--loss_type", default="cispo", choices=["cispo", "grpo"])
    parser.add_argument("--epsilon", type=float, default=0.2, help="GRPO: clip the ratio to [1-ε, 1+ε]")
    parser.add_argument("--epsilon_high", type=float, default=5.0, help="CISPO: clip the (detached) ratio above")
    parser.add_argument("--loss_agg", default="sequence", choices=["sequence", "token"],
                        help="sequence: mean over each reply's tokens, then over replies (MiniMind); token: one mean "
                             "over all reply tokens (DAPO / Dr. GRPO)")
    # The demo: lr far above MiniMind's 3e-7 (tuned for its long runs), so a reward the demo SFT model can reach moves
    # within ~100 steps; replies up to 128 tokens, so that growing past the length reward's 20 characters does not
    # cut them off before their <|im_end|> (with 48, the format reward fell as the length reward rose); temperature
    # 0.7, where the demo SFT model's replies are often too short: room to learn (at 1.0 it starts near the ceiling).
    args = parse_args(parser, argv, rl_file, demo=dict(batch_size=2, num_generations=6, max_gen_len=128,
                                                       temperature=0.7, max_seq_len=128, learning_rate=3e-5,
                                                       thinking_ratio=0.0, max_steps=100, time_budget=540,
                                                       log_interval=5, save_interval=50,
                                                       rewards="length,repetition,format"))
    check_rl_args(parser, args)
    if args.num_generations < 2:
        parser.error("--num_generations must be at least 2: a group of one has no spread to learn from")
    return args


def grpo_stage(args: Namespace) -> Stage:
    grpo = GRPO(args)
    return Stage("grpo", rl_data, loss_fn=grpo, loss_weight=grpo.loss_weight, setup=grpo.setup, collate=rows_collate,
                 rollout=grpo.rollout)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run(grpo_stage(args), args)


if __name__ == "__main__":
    main()
