"""Stage 3b, DPO (Rafailov et al. 2023): prefer the chosen reply over the rejected one, relative to a frozen reference.

    loss = -log σ(β·((π_c − ref_c) − (π_r − ref_r)))

π_c, π_r: log-probability of the chosen / rejected reply under the policy (trained, starts as the full-SFT model);
ref_c, ref_r: the same under the reference (the full-SFT model, frozen). A reply's log-probability is the sum over its
assistant tokens (standard DPO, current MiniMind); --dpo_length_norm takes the mean instead (MiniMind2).

    python trainer/train_dpo.py                              # after train_full_sft.py; no data or no GPU: demo-sized
    python trainer/train_dpo.py --data_path dataset/dpo.jsonl                # GPU: MiniMind's recipe
"""

import copy
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from dataset import IGNORE_INDEX, DPODataset, pad_collate, resolve_data_path
from trainer import Stage, build_parser, parse_args, run
from trainer.stage import Batch


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, length_norm: bool = False) -> torch.Tensor:
    """Per row, the log-probability of its supervised tokens (label != IGNORE_INDEX): their sum, or mean with length_norm.

    Labels are aligned with the inputs, so the logits at position t score the label at t+1.
    """
    targets = labels[:, 1:]
    # cross_entropy gives -log p(target) per token, and exactly 0 where the target is ignored
    token_logps = -F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view_as(targets)
    total = token_logps.sum(-1)
    return total / (targets != IGNORE_INDEX).sum(-1).clamp(min=1) if length_norm else total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss of a batch of pairs from their sequence log-probs, and its rewards β·(π − ref).

    Policy == reference gives rewards 0 and a loss of exactly ln 2 = 0.693: where every DPO run starts.
    """
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    margin = chosen - rejected
    metrics = {"reward_margin": margin.mean(), "chosen_reward": chosen.mean(), "rejected_reward": rejected.mean(),
               "accuracy": (margin > 0).float().mean()}
    return -F.logsigmoid(margin).mean(), metrics


def pair_collate(items: list[Batch]) -> Batch:
    """All chosen rows, then all rejected rows, padded to one length: both halves go through ONE forward pass
    (one DDP forward per backward, and one big matmul instead of two)."""
    batch = pad_collate(items)
    return {"input_ids": torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
            "labels": torch.cat([batch["chosen_labels"], batch["rejected_labels"]])}


def dpo_file(args: Namespace) -> Path:
    return resolve_data_path(args.data_path, ["dpo.jsonl"], "dpo.jsonl")


def dpo_data(args: Namespace, tokenizer) -> DPODataset:
    return DPODataset(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                      cache_dir=args.cache_dir)


@dataclass
class DPOLoss:
    """The DPO loss with its reference model, a frozen copy of the policy's starting weights made in ``setup``.

    The reference is computed on the fly under no_grad (one forward without activations kept, ~1/3 of a training
    step): precomputing it would pay off only from the second epoch, and MiniMind's DPO runs one.
    """

    beta: float
    length_norm: bool = False
    reference: nn.Module | None = None

    def setup(self, model: nn.Module, args: Namespace) -> None:
        # after --from_weight and before --from_resume: the reference is the SFT model even when a run resumes
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        with torch.no_grad():
            ref = sequence_logps(self.reference(input_ids=batch["input_ids"]).logits, labels, self.length_norm)
        out = model(input_ids=batch["input_ids"])
        policy = sequence_logps(out.logits, labels, self.length_norm)
        loss, metrics = dpo_loss(*policy.chunk(2), *ref.chunk(2), self.beta)
        if out.aux_loss is not None:  # MoE: keep the experts balanced
            loss, metrics["aux_loss"] = loss + out.aux_loss, out.aux_loss
        return loss, metrics


def pair_count(batch: Batch) -> int:
    """What the DPO loss is a mean over: pairs (a batch holds each pair's chosen and rejected row)."""
    return len(batch["input_ids"]) // 2


def dpo_stage(args: Namespace) -> Stage:
    dpo = DPOLoss(args.beta, args.dpo_length_norm)
    return Stage("dpo", dpo_data, loss_fn=dpo, loss_weight=pair_count, setup=dpo.setup, collate=pair_collate)


def parse(argv: list[str] | None = None) -> Namespace:
    parser = build_parser(__doc__, epochs=1, batch_size=4, learning_rate=4e-8, max_seq_len=1024, save_interval=100,
                          from_weight="full_sft", save_weight="dpo", wandb_project="MiniMind-DPO")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's β: how far the policy may drift from the "
                        "reference (MiniMind2: 0.1, minimind-3: 0.15)")
    parser.add_argument("--dpo_length_norm", action="store_true", help="mean log-prob per assistant token instead of "
                        "the sum (MiniMind2); rewards shrink ~length-fold, so β wants to be larger")
    # MiniMind's 4e-8 suits its large real run; a demo run of ~100 steps needs ~100x more to move visibly.
    return parse_args(parser, argv, dpo_file, demo=dict(max_seq_len=256, learning_rate=5e-6, max_steps=100,
                                                        log_interval=5, eval_interval=50, eval_size=16))


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run(dpo_stage(args), args)


if __name__ == "__main__":
    main()
