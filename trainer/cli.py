"""A stage script's process around the engine: what it prints when it ends, what it exits with, and what to run next."""

from __future__ import annotations

import os
import shlex
import sys
from argparse import Namespace

from dataset import DataError
from model.files import SaveError
from model.loading import STARTS_FROM, TRAIN_SCRIPTS
from model.weights import CheckpointMismatch
from trainer.engine import Result, TrainingDiverged, train
from trainer.runtime import shutdown
from trainer.stage import Stage

# The pipeline, stage by stage: what each one's weights are for next (speedrun.sh runs it in one go).
NEXT = {"pretrain": ["full_sft"], "full_sft": ["dpo", "lora", "grpo", "chat"], "dpo": ["grpo", "chat"],
        "lora": ["chat"], "grpo": ["chat"], "ppo_actor": ["chat"], "agent": ["chat"], "full_dist": ["chat"]}
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


def run(stage: Stage, args: Namespace) -> None:
    """A stage script's whole main: train, say what comes next, and leave DDP cleanly. A diverged run, bad data, a
    missing file or a checkpoint that does not fit exits 1 with its message alone (it says what to do; a traceback
    would bury it); Ctrl-C exits 130 after saving (a second Ctrl-C: at once)."""
    try:
        result = train(stage, args)
    except TrainingDiverged as e:
        print(f"\n[stopped] {e}", file=sys.stderr, flush=True)
        shutdown(1)
    except (DataError, FileNotFoundError, CheckpointMismatch, SaveError) as e:
        print(f"\nerror: {e}", file=sys.stderr, flush=True)
        shutdown(1)
    except KeyboardInterrupt:
        print("\n[interrupt] aborted: the last save stands (saves are atomic: no file is left half-written)",
              file=sys.stderr, flush=True)
        shutdown(INTERRUPTED)
    if (text := what_next(stage.name, args, result, sys.argv)) and int(os.environ.get("RANK", 0)) == 0:
        print(text, flush=True)
    shutdown(INTERRUPTED if result.stopped == "interrupt" else 0)


def what_next(stage: str, args: Namespace, result: Result, argv: list[str]) -> str:
    """The commands to run after this one: this run again with --from_resume 1 if it stopped early, and the next
    stages of the pipeline once there is something to go on from."""
    lines = [f"continue this run: {resume_command(argv)}"] if result.stopped else []
    if result.stopped != "interrupt":
        lines += [f"next: {command}" for command in next_commands(stage, args)]
    return "\n".join(lines)


def resume_command(argv: list[str]) -> str:
    """The command this process was started with (python or torchrun), with --from_resume 1."""
    flags, skip = [], False
    for arg in argv[1:]:
        if skip or arg.startswith("--from_resume="):
            skip = False
        elif arg == "--from_resume":
            skip = True  # and its value
        else:
            flags.append(arg)
    world, local = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = ["python"] if world == 1 else ["torchrun", "--nproc_per_node", str(local)]
    if world > local:
        launcher.append("<your other torchrun flags, on each node>")
    return shlex.join([*launcher, argv[0], *flags, "--from_resume", "1"])


def next_commands(stage: str, args: Namespace) -> list[str]:
    """The next stages after ``stage`` (``NEXT``), for the model this run saved: same shape flags and --out_dir."""
    shape = [word for flag in ("preset", "hidden_size", "num_hidden_layers", "use_moe", "out_dir")
             if (value := getattr(args, flag, None)) is not None for word in (f"--{flag}", str(value))]
    commands = []
    for after in NEXT.get(stage, []):
        if after == "chat":
            weight = ["--weight", args.from_weight, "--lora_weight", args.lora_name] if stage == "lora" else \
                ["--weight", args.save_weight]
            words = ["python", "eval_llm.py", *weight]
        else:  # a training stage starts from this one's weights, by their name (unless that is its default)
            words = ["python", f"trainer/{TRAIN_SCRIPTS.get(after, f'train_{after}.py')}"]
            words += ["--from_weight", args.save_weight] if args.save_weight != STARTS_FROM.get(after) else []
        commands.append(shlex.join([*words, *shape]))
    return commands
