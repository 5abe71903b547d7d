"""The command-line flags every stage shares, declared once. MiniMind's names are honoured, so its commands work."""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from dataset import files as data_files
from model import MiniMindConfig
from model.cli import HelpFormatter
from model.devices import best_device
from model.files import out_dir
from model.weights import vocab_fingerprint

DEMO_TIME_BUDGET = 540  # seconds: every stage's demo run stops after 9 minutes, whatever the machine


class FlagParser(argparse.ArgumentParser):
    """argparse, whose error for a mistyped flag names the flag it was probably meant to be."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            known = [flag for action in self._actions for flag in action.option_strings]
            typed = [word.split("=")[0] for word in message.split(": ", 1)[1].split() if word.startswith("--")]
            close = [match for word in typed for match in difflib.get_close_matches(word, known, n=1)]
            message += f" (did you mean {' / '.join(close)}?)" if close else ""
        super().error(message)


def fail(message: str) -> NoReturn:
    """A flag with a bad value: one line, without the usage text (that is for flags argparse cannot parse)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def build_parser(description: str, **defaults: Any) -> argparse.ArgumentParser:
    """The shared flags with a stage's own defaults (``lr``, ``epochs``, ...); a stage adds its own flags to it."""
    p = FlagParser(description=description, formatter_class=HelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--epochs", type=int, default=1, help="passes over the training rows")
    run.add_argument("--batch_size", type=int, default=32, help="rows per micro-batch per GPU")
    run.add_argument("--learning_rate", type=float, default=5e-4, help="peak LR; the cosine ends at 0.1x")
    run.add_argument("--warmup_iters", type=int, default=0, help="linear warmup steps before the cosine")
    run.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm (0: off)")
    run.add_argument("--max_steps", type=int, default=0,
                     help="train this many optimizer steps (0: all epochs); the LR schedule spans them")
    run.add_argument("--time_budget", type=float, default=0,
                     help="stop after this many seconds, set-up included: checked after every step; the run then "
                          "evaluates, saves and prints the --from_resume 1 command (0: no limit)")
    run.add_argument("--seed", type=int, default=42, help="seeds the initial weights, the split and the data order")
    run.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best there is)")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="autocast dtype (auto: bf16 on CUDA, fp16 on GPUs without bf16, fp32 on CPU and MPS)")
    run.add_argument("--use_compile", type=int, default=0, choices=[0, 1], help="torch.compile the model")
    run.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead"],
                     help="with --use_compile: reduce-overhead adds CUDA graphs (fastest for pretraining's fixed-shape "
                          "packed rows; not with DDP; every new batch shape, and MoE's data-dependent expert "
                          "slices, record new graphs)")
    run.add_argument("--num_workers", type=int, default=None, help="data loader workers (default: 0 on CPU, 4 else)")
    run.add_argument("--ddp", action="store_true", help="accepted for MiniMind's commands; torchrun sets DDP up")
    run.add_argument("--local_rank", type=int, default=-1, help="accepted for MiniMind's commands; torchrun sets it")

    shape = p.add_argument_group("model (a --preset, or MiniMind's flags; flags override the preset)")
    shape.add_argument("--preset", default=None, help="minimind2-small, minimind2, minimind2-moe, minimind3, ...")
    shape.add_argument("--hidden_size", type=int, default=None, help="default 512")
    shape.add_argument("--num_hidden_layers", type=int, default=None, help="default 8")
    shape.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="default 0")
    shape.add_argument("--max_seq_len", type=int, default=512, help="tokens per training row")

    io = p.add_argument_group("data and checkpoints")
    io.add_argument("--data_path", default=None,
                    help="jsonl file (default: MiniMind's file in dataset/, else the demo)")
    io.add_argument("--skip_bad_lines", action="store_true", help="skip unreadable rows instead of stopping")
    io.add_argument("--cache_dir", default=None,
                    help="where token caches and line indexes go (default: <data dir>/.cache, or ~/.cache/minimind-lab "
                         "when the data folder is read-only)")
    io.add_argument("--from_weight", default="none", help="a stage name (out/<name>_<hidden>.pth), a path, or none")
    io.add_argument("--from_resume", type=int, default=0, choices=[0, 1], help="continue the run from its resume file")
    io.add_argument("--save_weight", default=None, help="checkpoint name prefix: out/<save_weight>_<hidden>.pth")
    io.add_argument("--out_dir", "--save_dir", dest="out_dir", default=None,
                    help="where checkpoints go (default: out/ in the repo; a relative path: in the current "
                         "directory if it has that folder, else in the repo)")
    io.add_argument("--save_interval", type=int, default=1000,
                    help="save weights + resume file every N steps (0: at the end only)")
    io.add_argument("--save_hf", action="store_true", help="also write a transformers folder (+ tokenizer)")

    log = p.add_argument_group("progress and logging")
    log.add_argument("--log_interval", type=int, default=100,
                     help="steps between progress updates and NaN checks (0: at saves only)")
    log.add_argument("--eval_interval", type=int, default=500, help="steps between held-out evals (0: end only)")
    log.add_argument("--eval_size", type=int, default=200, help="rows held out for eval (0: no eval)")
    log.add_argument("--use_wandb", "--use_swanlab", dest="use_wandb", action="store_true", help="log to swanlab")
    log.add_argument("--wandb_project", default="MiniMind", help="the swanlab project (with --use_wandb)")
    log.add_argument("--peak_tflops", type=float, default=None, help="GPU peak for MFU (default: from its name)")
    p.set_defaults(**defaults)
    return p


def model_config(args: argparse.Namespace, tokenizer: Any) -> MiniMindConfig:
    """The model shape from --preset and/or --hidden_size / --num_hidden_layers / --use_moe (flags win), for the
    vocabulary of ``tokenizer`` (recorded, so checkpoints can refuse another one)."""
    flags = dict(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers, use_moe=args.use_moe)
    overrides = {k: (bool(v) if k == "use_moe" else v) for k, v in flags.items() if v is not None}
    vocab = dict(vocab_size=len(tokenizer), tokenizer_vocab=vocab_fingerprint(tokenizer))
    if args.preset:
        return MiniMindConfig.from_preset(args.preset, **vocab, **overrides)
    return MiniMindConfig(**overrides, **vocab)  # MiniMind2-Small, 26M, unless flags say otherwise


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
               data_file: Callable[[argparse.Namespace], Path] | None = None,
               demo: dict[str, Any] | None = None) -> argparse.Namespace:
    """Parse the flags; ``data_file(args)`` (the stage's data lookup) is resolved once into ``args.data_path``.

    On a CPU, or on the bundled demo data (no --data_path and none of the stage's MiniMind files in dataset/),
    ``demo`` replaces the GPU-sized defaults the user did not type, so a bare ``python trainer/train_<stage>.py``
    finishes in minutes and learns something; one line says why. A typed flag is never changed."""
    args = parser.parse_args(argv)
    for flag in ("batch_size", "accumulation_steps", "epochs", "max_seq_len"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} must be at least 1")
    for flag in ("max_steps", "warmup_iters", "save_interval", "log_interval", "eval_interval", "eval_size"):
        if getattr(args, flag) < 0:
            fail(f"--{flag} must not be negative (0: see --help)")
    if args.compile_mode != "default" and not args.use_compile:
        fail(f"--compile_mode {args.compile_mode} needs --use_compile 1")
    if args.compile_mode == "reduce-overhead" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fail("--compile_mode reduce-overhead (CUDA graphs) does not work with DDP's gradient hooks: use "
             "--compile_mode default under torchrun")
    if problem := unwritable(folder := out_dir(args.out_dir)):
        fail(f"cannot save checkpoints in {folder}: {problem} (--out_dir picks another folder)")
    demo_data = False
    if data_file is not None:
        try:
            path = data_file(args)
        except FileNotFoundError as e:
            fail(str(e))
        demo_data = args.data_path is None and data_files.is_demo_file(path)
        args.data_path = str(path)  # a str: args go into resume files and loggers
    on_cpu = (args.device or best_device()) == "cpu"
    if demo and (on_cpu or demo_data):
        demo = {**demo, "time_budget": demo.get("time_budget", DEMO_TIME_BUDGET)}
        with_demo = copy.deepcopy(parser)
        with_demo.set_defaults(**demo)
        demo_args = vars(with_demo.parse_args(argv))  # a typed flag still wins over a default
        changed = {k: demo_args[k] for k in demo if demo_args[k] != getattr(args, k)}
        vars(args).update(changed)
        if changed and int(os.environ.get("RANK", 0)) == 0:
            flags = " ".join(f"--{k} {v}" for k, v in changed.items())
            why, full = (("[cpu] no GPU", "a GPU") if on_cpu else
                         ("[demo] training on the bundled demo data (no MiniMind file for this stage in dataset/)",
                          "its data (download: the line above)"))
            print(f"{why}: a demo-sized run ({flags}). Type any of these flags to choose yourself; "
                  f"MiniMind's full run wants {full}.")
    return args


def unwritable(folder: Path) -> str | None:
    """Why checkpoints cannot be written to ``folder`` (made when first needed), or None: found at start-up rather
    than at the first save."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            what = "it" if existing == folder else str(existing)
            if not existing.is_dir():
                return f"{what} is a file"
            return None if os.access(existing, os.W_OK | os.X_OK) else f"{what} is not writable"
    return None
