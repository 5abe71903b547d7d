"""Peak host memory (RSS) of one GRPO step, rollout and update included, with or without a 1.8B-class reward model.

    python scripts/rl_memory.py                          # 26M preset, 2 prompts x 6 generations x 512 new tokens
    python scripts/rl_memory.py --reward_model /tmp/rm   # and a reward model of InternLM2-1.8B-reward's shape, bf16
    python scripts/rl_memory.py --loss_type grpo         # any other flag goes to train_grpo.py (and wins)

It runs `trainer/train_grpo.py` for one step in a child process (random policy weights, so replies rarely stop before
--max_gen_len) and reports that process's peak resident set size (ru_maxrss from wait4: the whole run, start-up and
the final save included). The reward model is built once, randomly initialised, in the folder --reward_model names
(about 3.4 GB on disk; an existing folder is reused): a LlamaForSequenceClassification with InternLM2-1.8B-reward's
shape (hidden 2048, 24 layers, 16 heads, 8 KV heads, intermediate 8192, vocabulary 92544, one label). Memory depends on
the shapes and dtypes, not on the values, so the real model would take the same (its own remote code aside).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from model.cli import HelpFormatter
from model.files import REPO_ROOT

# InternLM2-1.8B-reward's shape (its config.json), as a stock transformers architecture
REWARD_SHAPE = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                    intermediate_size=8192, vocab_size=92544, num_labels=1, pad_token_id=0)


def build_reward_model(folder: Path) -> None:
    """A randomly initialised bf16 reward model of REWARD_SHAPE, with this repo's tokenizer, saved to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from model.loading import load_tokenizer

    config = LlamaConfig(**REWARD_SHAPE)
    model = LlamaForSequenceClassification._from_config(config, dtype=torch.bfloat16)
    print(f"[rl_memory] a random reward model of {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"parameters (bf16) -> {folder}", flush=True)
    model.save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)


def grpo_flags(args: argparse.Namespace, out_dir: Path, extra: list[str]) -> list[str]:
    flags = ["--from_weight", "none", "--preset", args.preset, "--device", "cpu", "--dtype", "float32",
             "--batch_size", str(args.batch_size), "--num_generations", str(args.num_generations),
             "--max_gen_len", str(args.max_gen_len), "--max_seq_len", "128", "--thinking_ratio", "0",
             "--rewards", "length,repetition,format", "--max_steps", "1", "--time_budget", "0",
             "--log_interval", "1", "--save_interval", "0", "--out_dir", str(out_dir)]
    if args.reward_model:
        flags += ["--reward_model_path", str(args.reward_model), "--reward_device", "cpu",
                  "--reward_dtype", "bfloat16"]
    return flags + extra


def peak_rss_gib(cmd: list[str]) -> float:
    """Run ``cmd``; its peak RSS in GiB (it must succeed)."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, "SWANLAB_MODE": "disabled"})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"[rl_memory] the GRPO run failed (exit {proc.returncode}): {' '.join(cmd)}")
    return usage.ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="minimind2-small", help="the policy's shape (26M: minimind2-small)")
    p.add_argument("--batch_size", type=int, default=2, help="prompts per step")
    p.add_argument("--num_generations", type=int, default=6)
    p.add_argument("--max_gen_len", type=int, default=512)
    p.add_argument("--reward_model", type=Path, help="a reward model folder to score with; built (random, bf16, "
                   "InternLM2-1.8B-reward's shape) when it does not exist")
    args, extra = p.parse_known_args(argv)
    if args.reward_model and not (args.reward_model / "config.json").is_file():
        build_reward_model(args.reward_model)
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, str(REPO_ROOT / "trainer" / "train_grpo.py"), *grpo_flags(args, Path(out_dir), extra)]
        peak = peak_rss_gib(cmd)
    with_rm = f", reward model {args.reward_model} (bf16)" if args.reward_model else ", no reward model"
    print(f"[rl_memory] peak RSS {peak:.2f} GiB: one GRPO step, {args.preset}, {args.batch_size} prompts x "
          f"{args.num_generations} generations x {args.max_gen_len} new tokens{with_rm}")
    return peak


if __name__ == "__main__":
    main()
