"""Plot an RL run's reward curve (mean reward and each component per step) from the log the run writes beside its
weights, out/<stage>_<hidden>_rewards.jsonl.

    python scripts/plot_rewards.py out/grpo_512_rewards.jsonl                     # -> out/grpo_512_rewards.png
    python scripts/plot_rewards.py out/grpo_512_rewards.jsonl --out docs/images/grpo_demo_reward.png --smooth 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path: Path) -> list[dict[str, float]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{number} is not a JSON line ({e})") from None
    if not records:
        raise SystemExit(f"error: {path} has no steps yet")
    return records


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and up to window-1 before it."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot(records: list[dict[str, float]], out: Path, smooth: int = 1, title: str | None = None) -> Path:
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name in ["reward"] + sorted(k for k in records[0] if k.startswith("reward/")):
        ax.plot(steps, moving_average([r[name] for r in records], smooth), label=name.removeprefix("reward/"),
                linewidth=2.2 if name == "reward" else 1.0, alpha=1.0 if name == "reward" else 0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward" + (f" (moving average of {smooth})" if smooth > 1 else ""))
    ax.set_title(title or out.stem)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log", type=Path, help="an RL run's *_rewards.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="the image (default: beside the log, .png)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in steps")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    if not args.log.is_file():
        parser.error(f"no log at {args.log}: an RL run (trainer/train_grpo.py, train_ppo.py) writes it")
    out = plot(read_log(args.log), args.out or args.log.with_suffix(".png"), max(1, args.smooth), args.title)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
