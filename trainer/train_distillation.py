"""Stage 3c, knowledge distillation (Hinton et al. 2015): a student learns the labels and a frozen teacher's
next-token distributions at once.

    loss = α·CE(labels) + (1 − α)·T²·KL(p_teacher ‖ p_student)      (p at temperature T: softmax(logits / T))

Both terms are means over the supervised positions (SFT data: assistant tokens; pretraining text: every token); the T²
keeps the soft term's gradient the size of the hard one's as T grows. The teacher is anything load_model reads: a stage
name at its own shape (``--teacher full_sft --teacher_hidden_size 768``), a .pth file, a transformers folder, an MoE
checkpoint; it must share the student's vocabulary. It runs under no_grad in eval mode, in the student's autocast
dtype, on the student's device unless --teacher_device says otherwise, and holds no optimizer state. The student
(the shared shape flags; MiniMind's --student_* names work too) starts from --from_weight and is saved as
out/full_dist_<hidden>.pth.

    python trainer/train_distillation.py                     # after train_full_sft.py; no data or no GPU: demo-sized
    python trainer/train_distillation.py --teacher full_sft --teacher_hidden_size 768 --teacher_num_layers 16 \\
        --hidden_size 512 --from_weight full_sft --data_path dataset/sft_mini_512.jsonl      # GPU: MiniMind's recipe
"""

import argparse
import json
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from dataset import IGNORE_INDEX, DataError, PretrainDataset, SFTDataset, resolve_data_path
from model.devices import check_device
from model.loading import find_weights, load_model
from model.weights import CheckpointMismatch, check_vocabulary, trained_vocabulary
from trainer import Stage, build_parser, parse_args, run
from trainer.args import fail
from trainer.stage import Batch

SAME_VOCABULARY = ("distillation compares the two models' next-token distributions id by id, so teacher and student "
                   "need one vocabulary: pick a teacher trained with the tokenizer in model/")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                      temperature: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """α·CE + (1 − α)·T²·KL(p_teacher ‖ p_student), each a mean over the supervised positions (label != IGNORE_INDEX),
    and the student–teacher top-1 agreement there. Labels are aligned with the inputs: the logits at t score label t+1.

    Masked positions are left out with ``where`` rather than gathered: no host sync, and whatever their logits hold
    (padding), they add exactly nothing.
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    count = supervised.sum().clamp(min=1)
    student, teacher = student_logits[:, :-1].float(), teacher_logits[:, :-1].float()
    # the model's own loss expression (MiniMindForCausalLM.forward), so --alpha 1 is SFT to the bit
    ce = F.cross_entropy(student.reshape(-1, student.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="sum") / count
    kl_per_position = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                               log_target=True, reduction="none").sum(-1)
    kl = torch.where(supervised, kl_per_position, 0.0).sum() / count
    agree = (student.argmax(-1) == teacher.argmax(-1)) & supervised
    loss = alpha * ce + (1 - alpha) * temperature ** 2 * kl
    return loss, {"ce": ce, "kl": kl, "top1_agreement": agree.sum() / count}


def load_teacher(args: Namespace, student: nn.Module) -> nn.Module:
    """--teacher as load_model reads it, frozen, on --teacher_device (default: the student's); refused in one line
    unless it shares the student's vocabulary."""
    try:
        source = find_weights(args.teacher, hidden_size=args.teacher_hidden_size, use_moe=teacher_moe(args),
                              preset=args.teacher_preset, directory=args.out_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--teacher {args.teacher}: {e}\n(The teacher's shape flags are --teacher_hidden_size, "
                                f"--teacher_use_moe and --teacher_preset.)") from None
    where = f"--teacher {source}"
    vocabulary = student.config.tokenizer_vocab
    if source.is_file():  # load_model would refuse it too, but with advice (--tokenizer) for eval_llm
        check_vocabulary(trained_vocabulary(source), vocabulary, where, SAME_VOCABULARY)
    device = args.teacher_device or str(next(student.parameters()).device)
    teacher, _ = load_model(source, hidden_size=args.teacher_hidden_size, num_hidden_layers=args.teacher_num_layers,
                            use_moe=teacher_moe(args), preset=args.teacher_preset, device=device, dtype=torch.float32)
    check_vocabulary(teacher.config.tokenizer_vocab, vocabulary, where, SAME_VOCABULARY)  # a folder's own tokenizer
    if teacher.config.vocab_size != student.config.vocab_size:
        raise CheckpointMismatch(f"{where} has {teacher.config.vocab_size} tokens, the student "
                                 f"{student.config.vocab_size}; {SAME_VOCABULARY}")
    return teacher.eval().requires_grad_(False)


def teacher_moe(args: Namespace) -> bool | None:
    return None if args.teacher_use_moe is None else bool(args.teacher_use_moe)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k].to(ours[k])) for k in ours)


@dataclass
class DistillationLoss:
    """The distillation loss with its teacher, loaded in ``setup``: held here, not inside the trained model, so the
    engine's optimizer, DDP and checkpoints never see it."""

    alpha: float
    temperature: float
    teacher: nn.Module | None = None

    def setup(self, model: nn.Module, args: Namespace) -> None:
        self.teacher = load_teacher(args, model)
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        print(f"teacher: {self.teacher.params_summary()} ({self.teacher.config.describe()}) on "
              f"{next(self.teacher.parameters()).device}; alpha {self.alpha:g}, temperature {self.temperature:g}",
              flush=True)
        if same_weights(model, self.teacher):
            print(f"note: the student starts as the teacher (--from_weight {args.from_weight}, --teacher "
                  f"{args.teacher}): the KL starts at 0, and the run is SFT held near the teacher. For a smaller "
                  f"student, type its --hidden_size / --num_hidden_layers and --from_weight", flush=True)

    def teacher_logits(self, batch: Batch) -> torch.Tensor:
        """The teacher's logits on the student's device, computed under the student's autocast (the engine's)."""
        here = batch["input_ids"].device
        there = next(self.teacher.parameters()).device
        amp = dict(dtype=torch.get_autocast_dtype(here.type), enabled=torch.is_autocast_enabled(here.type))
        with torch.no_grad(), torch.autocast(there.type, **amp):
            inputs = {k: v.to(there) for k, v in batch.items() if k in ("input_ids", "position_ids")}
            return self.teacher(**inputs).logits.to(here)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_logits = self.teacher_logits(batch)
        out = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"))
        loss, metrics = distillation_loss(out.logits, teacher_logits, batch["labels"], self.alpha, self.temperature)
        if out.aux_loss is not None:  # MoE student: its balancing loss in full, whatever alpha
            loss, metrics["aux_loss"] = loss + out.aux_loss, out.aux_loss
        return loss, metrics


def distillation_file(args: Namespace) -> Path:
    """--data_path (SFT or pretraining rows), else MiniMind's SFT files as train_full_sft.py finds them, else the
    bundled demo."""
    return resolve_data_path(args.data_path, ["sft_t2t_mini.jsonl", "sft_mini_512.jsonl"], "sft.jsonl")


def detect_kind(path: str | Path) -> str:
    """``sft`` or ``pretrain``, from the first row of a jsonl file: {"conversations": ...} or {"text": ...}."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                break
        else:
            raise DataError(f"{path} has no rows")
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        row = None
    for key, kind in (("conversations", "sft"), ("text", "pretrain")):
        if isinstance(row, dict) and key in row:
            return kind
    raise DataError(f"{path}:{lineno}: neither an SFT row ({{\"conversations\": ...}}) nor a pretraining row "
                    f"({{\"text\": ...}}); pass --data_kind sft or pretrain")


def distillation_data(args: Namespace, tokenizer) -> SFTDataset | PretrainDataset:
    kind = detect_kind(args.data_path) if args.data_kind == "auto" else args.data_kind
    if kind == "pretrain":
        return PretrainDataset(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                               cache_dir=args.cache_dir)
    return SFTDataset(args.data_path, tokenizer, args.max_seq_len, skip_bad_lines=args.skip_bad_lines,
                      cache_dir=args.cache_dir)


def distillation_stage(args: Namespace) -> Stage:
    distill = DistillationLoss(args.alpha, args.temperature)
    return Stage("full_dist", distillation_data, loss_fn=distill, setup=distill.setup)


def alias(group: argparse._ArgumentGroup, flag: str, of: str, **kwargs) -> None:
    """MiniMind's name ``flag`` for our ``--<of>``: the same setting (argparse dest), so either may be typed."""
    group.add_argument(flag, dest=of, default=argparse.SUPPRESS, help=f"MiniMind's name for --{of}", **kwargs)


def parse(argv: list[str] | None = None) -> Namespace:
    parser = build_parser(__doc__, epochs=6, batch_size=32, learning_rate=5e-6, max_seq_len=340, save_interval=100,
                          from_weight="full_sft", save_weight="full_dist", wandb_project="MiniMind-Distillation")
    kd = parser.add_argument_group("distillation")
    kd.add_argument("--teacher", "--from_teacher_weight", dest="teacher", default="full_sft",
                    help="a stage name (out/<name>_<teacher_hidden_size>[_moe].pth), a .pth path or a transformers "
                         "folder")
    kd.add_argument("--teacher_hidden_size", type=int, default=None,
                    help="picks the teacher's file by name (default 512, or the only one there)")
    kd.add_argument("--teacher_num_layers", "--teacher_num_hidden_layers", dest="teacher_num_layers", type=int,
                    default=None, help="optional: the file's own shape is used")
    kd.add_argument("--teacher_use_moe", type=int, default=None, choices=[0, 1], help="picks the _moe file")
    kd.add_argument("--teacher_preset", default=None, help="the teacher's preset (names its file like its flags)")
    kd.add_argument("--teacher_device", default=None, help="where the teacher runs (default: the student's device)")
    kd.add_argument("--alpha", type=float, default=0.5, help="weight of the CE on the labels; 1 - alpha: the KL's")
    kd.add_argument("--temperature", type=float, default=1.5, help="softens both distributions in the KL term")
    kd.add_argument("--data_kind", default="auto", choices=["auto", "sft", "pretrain"],
                    help="sft: loss on assistant tokens; pretrain: on every token of packed text; auto: from the "
                         "file's first row")
    alias(kd, "--student_hidden_size", "hidden_size", type=int)
    alias(kd, "--student_num_layers", "num_hidden_layers", type=int)
    alias(kd, "--student_use_moe", "use_moe", type=int, choices=[0, 1])
    alias(kd, "--from_student_weight", "from_weight")
    # A student from random weights (the demo's: half the width and layers of the demo teacher) needs a
    # pretraining-sized learning rate, not MiniMind's 5e-6 for a student that starts from its own SFT model.
    args = parse_args(parser, argv, distillation_file, demo=dict(
        hidden_size=256, num_hidden_layers=4, from_weight="none", batch_size=8, max_seq_len=256, learning_rate=2e-3,
        max_steps=300, time_budget=540, log_interval=10, eval_interval=100, eval_size=32))
    if not 0 <= args.alpha <= 1:
        fail(f"--alpha {args.alpha} must be between 0 (teacher only) and 1 (labels only)")
    if args.temperature <= 0:
        fail(f"--temperature {args.temperature} must be positive")
    if args.teacher_device:
        try:
            check_device(args.teacher_device)
        except ValueError as e:
            fail(f"--teacher_device: {e}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run(distillation_stage(args), args)


if __name__ == "__main__":
    main()
