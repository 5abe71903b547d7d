"""Stage 4, PPO (Schulman et al. 2017) with a critic: the RLHF recipe of InstructGPT, MiniMind's train_ppo.py.

Per prompt one reply is sampled and scored (trainer/rewards.py, + an optional reward model). Per reply token the
reward is −kl_coef·(log π_old − log ref), plus the reply's score at its last token. A critic (a MiniMind trunk with a
value head, initialised from the starting policy) estimates values V; GAE(γ, λ) turns rewards and values into
advantages A (whitened over the step's replies on all ranks) and returns R = A + V_old. Then --ppo_update_iters
passes over the rollout, one optimizer step per mini-batch of --mini_batch_size replies, each with the mean over reply
tokens of

    policy  −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A),   ρ = π/π_old                                   (ε: --clip_epsilon)
    value   vf_coef · ½·max((V − R)², (V_old + clip(V − V_old, ±cliprange_value) − R)²)

A pass stops early once the mean log π_old − log π passes --early_stop_kl. π_old is a no-grad forward over the sampled
replies made exactly as the training forward (the first ratio is 1 to the bit); the reference is a frozen copy of the
starting weights. The critic is a submodule of the policy during training (one optimizer, its own LR via
--critic_learning_rate, DDP and the resume file carry it); the weights file holds the actor alone
(out/ppo_actor_<hidden>.pth, what eval_llm.py --weight ppo_actor loads), the critic goes to out/ppo_critic_<hidden>.pth.

    python trainer/train_ppo.py                 # after train_full_sft.py (or dpo); no data or no GPU: demo-sized
"""

from __future__ import annotations

import copy
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dataset.rl_dataset import rows_collate
from model import MiniMindForCausalLM
from model.weights import save_weights
from trainer import Stage, parse_args, run
from trainer.args import fail
from trainer.rollout import (RLStage, check_rl_args, masked_mean, reply_logps, reward_metrics,
                             rewards_total, rl_data, rl_file, rl_parser)
from trainer.runtime import Runtime, all_ranks, any_rank
from trainer.stage import Batch


class Critic(nn.Module):
    """V(state) for every reply token: a MiniMind trunk (a copy of the policy's) and a linear value head."""

    def __init__(self, policy: MiniMindForCausalLM):
        super().__init__()
        self.config = policy.config
        self.model = copy.deepcopy(policy.model)
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: the first value loss is about the returns alone
        nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        """[N, R]: the value of the state before each reply token (where the policy's logits for it are)."""
        reply_len = batch["reply_mask"].shape[1]
        hidden = self.model(batch["input_ids"], batch["attention_mask"])[0][:, -reply_len - 1:-1]
        return self.value_head(hidden).squeeze(-1).float()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over reply tokens ([N, R]; past a reply's end, mask 0): advantages and
    returns (advantages + values). δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}, both 0 past the end."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        running = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * running
        running = running * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float) \
        -> torch.Tensor:
    """Per token: ½·max((V − R)², (V_old + clip(V − V_old, ±clip) − R)²) (PPO2's value clipping)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def whiten(values: torch.Tensor, mask: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """(x − mean) / std over the masked-in entries of ``values`` on all ranks (one small all-reduce)."""
    mask = mask.to(values.dtype)
    sums = all_ranks(rt, torch.stack([(values * mask).sum(), (values ** 2 * mask).sum(), mask.sum()]))
    mean = sums[0] / sums[2].clamp(min=1)
    var = sums[1] / sums[2].clamp(min=1) - mean ** 2
    return (values - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8) * mask


def take(batch: Batch, start: int, size: int) -> Batch:
    """Replies start..start+size of a rollout batch."""
    return {k: v[start:start + size] for k, v in batch.items()}


class PPO(RLStage):
    """The stage: RLStage's policy, reference and rollout, the critic (a submodule of the policy), the PPO losses."""

    def __init__(self, args: Namespace):
        super().__init__(args)
        self.approx_kl = torch.zeros(())  # of the last mini-batch: for the early stop

    def setup(self, model: nn.Module, args: Namespace) -> None:
        super().setup(model, args)  # the reference is copied before the critic joins
        model.critic = Critic(model).to(next(model.parameters()).device)  # resumed with the policy

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        critic = {id(p) for p in model.critic.parameters()}
        actor = [p for p in model.parameters() if p.requires_grad and id(p) not in critic]
        return [{"params": actor}, {"params": list(model.critic.parameters()),
                                    "lr_scale": self.args.critic_learning_rate / self.args.learning_rate}]

    @torch.no_grad()
    def score(self, model: nn.Module, prompts: list[dict[str, Any]], step: int, rt: Runtime) -> Batch:
        """Sample and score replies, then (rewards first) the old, reference and value forwards, and the per-token
        rewards."""
        a = self.args
        batch = self.rollouts.sample(self.policy, prompts, step, rt)
        with rt.autocast():
            batch["old_logps"] = reply_logps(model, batch, a.temperature)[0]
            ref_logps = reply_logps(self.reference, batch, a.temperature)[0]
            batch["old_values"] = self.policy.critic(batch)
        mask = batch["reply_mask"]
        score = rewards_total(batch)
        batch["reward_skipped"] = (~torch.isfinite(score)).float()
        token_rewards = -a.kl_coef * (batch["old_logps"] - ref_logps) * mask
        last = (mask.sum(-1) - 1).clamp(min=0)
        token_rewards[torch.arange(len(last)), last] += torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0)
        batch["advantages"], batch["returns"] = gae(token_rewards, batch["old_values"], mask, a.gamma, a.lam)
        return batch

    def rollout(self, model: nn.Module, rows: list[list[dict[str, Any]]], step: int, rt: Runtime) \
            -> Iterator[list[Batch]]:
        """--ppo_update_iters passes over the step's replies, one optimizer step per mini-batch."""
        batches = [self.score(model, prompts, step, rt) for prompts in rows]
        self.reward_log.write(step, batches, rt)
        # whitened over all of the step's replies, on all ranks
        joined = whiten(torch.cat([b["advantages"].flatten() for b in batches]),
                        torch.cat([b["reply_mask"].flatten() for b in batches]), rt)
        for batch, part in zip(batches, joined.split([b["advantages"].numel() for b in batches])):
            batch["advantages"] = part.view_as(batch["advantages"])
        size = self.args.mini_batch_size or len(batches[0]["reply_mask"])
        for _ in range(self.args.ppo_update_iters):
            for start in range(0, len(batches[0]["reply_mask"]), size):
                yield [take(b, start, size) for b in batches]
                (too_far,) = any_rank(rt, self.approx_kl.item() > self.args.early_stop_kl)
                if too_far:
                    return

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = self.args
        mask = batch["reply_mask"]
        logps, aux_loss = reply_logps(model, batch, a.temperature)
        ratio = torch.exp(logps - batch["old_logps"])
        adv = batch["advantages"]
        policy_loss = masked_mean(-torch.min(ratio * adv, ratio.clamp(1 - a.clip_epsilon, 1 + a.clip_epsilon) * adv),
                                  mask, per_sequence=False)
        values = self.policy.critic(batch)
        value_loss = masked_mean(clipped_value_loss(values, batch["old_values"], batch["returns"], a.cliprange_value),
                                 mask, per_sequence=False)
        self.approx_kl = masked_mean((batch["old_logps"] - logps).detach(), mask, per_sequence=False)
        loss = policy_loss + a.vf_coef * value_loss
        metrics = {**reward_metrics(batch), "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                   "approx_kl": self.approx_kl, "reward_skipped": batch["reward_skipped"].mean(),
                   "clip_frac": masked_mean(((ratio - 1).abs() > a.clip_epsilon).float(), mask, per_sequence=False)}
        if aux_loss is not None:  # MoE: keep the experts balanced
            loss, metrics["aux_loss"] = loss + aux_loss, aux_loss
        return loss, metrics


def reply_tokens(batch: Batch) -> float:
    """What the PPO losses are a mean over: reply tokens."""
    return float(batch["reply_mask"].sum())


def save_actor_and_critic(model: nn.Module, path: Path) -> None:
    """The weights file holds the actor alone (what inference loads); the critic goes beside it."""
    model = getattr(model, "module", model)
    critic = model._modules.pop("critic")  # out of the actor's state dict for this save only
    try:
        save_weights(model, path)
    finally:
        model.critic = critic
    save_weights(critic, path.with_name(path.name.replace("ppo_actor", "ppo_critic", 1)))


def parse(argv: list[str] | None = None) -> Namespace:
    parser = rl_parser(__doc__, "ppo_actor", "MiniMind-PPO", num_generations=1)  # the critic is the baseline
    parser.add_argument("--clip_epsilon", type=float, default=0.2, help="clip the ratio to [1-ε, 1+ε]")
    parser.add_argument("--vf_coef", type=float, default=0.5, help="weight of the value loss")
    parser.add_argument("--kl_coef", type=float, default=0.02, help="per-token KL penalty in the reward")
    parser.add_argument("--gamma", type=float, default=1.0, help="GAE discount")
    parser.add_argument("--lam", type=float, default=0.95, help="GAE λ")
    parser.add_argument("--cliprange_value", type=float, default=0.2, help="clip the value change to ±this")
    parser.add_argument("--ppo_update_iters", type=int, default=2, help="passes over each rollout batch")
    parser.add_argument("--early_stop_kl", type=float, default=0.25, help="end a rollout's passes past this KL")
    parser.add_argument("--critic_learning_rate", type=float, default=5e-7, help="the critic's peak LR")
    parser.add_argument("--mini_batch_size", type=int, default=0,
                        help="replies per optimizer step, per micro-batch (0: all of them)")
    args = parse_args(parser, argv, rl_file, demo=dict(batch_size=4, max_gen_len=48, max_seq_len=128,
                                                       learning_rate=1e-5, critic_learning_rate=1e-4,
                                                       thinking_ratio=0.0, max_steps=60, time_budget=540,
                                                       log_interval=5, save_interval=30,
                                                       rewards="length,repetition,format"))
    check_rl_args(args)
    if args.ppo_update_iters < 1 or args.mini_batch_size < 0:
        fail("--ppo_update_iters must be at least 1 and --mini_batch_size not negative")
    return args


def ppo_stage(args: Namespace) -> Stage:
    ppo = PPO(args)
    return Stage("ppo", rl_data, loss_fn=ppo, loss_weight=reply_tokens, setup=ppo.setup, collate=rows_collate,
                 rollout=ppo.rollout, param_groups=ppo.param_groups, save_weights=save_actor_and_critic)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run(ppo_stage(args), args)


if __name__ == "__main__":
    main()
