r"""Score a model on the standard benchmarks with EleutherAI's lm-evaluation-harness.  用 lm-eval 跑标准评测。

    python scripts/eval_bench.py --weight full_sft                        # MiniMind's seven tasks, its numbers beside
    python scripts/eval_bench.py --weight full_sft --tasks arc_easy,piqa --limit 200
    python scripts/eval_bench.py --weight full_sft --tasks gsm8k --limit 50   # generative: exact match
    # MiniMind's released weights, as its README's table was made (its tokenizer, its chat template):
    python scripts/eval_bench.py --load_from path/to/minimind-3 --chat_template
    python scripts/eval_bench.py --weight path/to/full_sft_768.pth --tokenizer path/to/minimind-3 --chat_template

Any model the other tools load (--weight, --load_from, --tokenizer, --lora_weight) goes in as it is loaded: lm-eval's
own Hugging Face wrapper (``HFLM``) scores it, so the numbers are lm-eval's, with no export and no scorer of ours.
Multiple-choice tasks compare the log-likelihood of each answer after the question (``acc``: summed over the answer's
tokens; ``acc_norm``: divided by its length in characters); generative ones (gsm8k) generate greedily and match the
answer.

The table shows each score with its standard error, the chance level (the mean of 1/number-of-choices over the items
scored), and MiniMind's published minimind-3 score for the same task (its README: lm-eval, ``acc``).

The task data comes from the Hugging Face hub the first time (``HF_ENDPOINT=https://hf-mirror.com`` for a mirror) and
is cached (``~/.cache/huggingface/datasets``); with the cache filled, ``HF_DATASETS_OFFLINE=1`` runs without network.
Your own tasks: a folder of lm-eval task YAMLs (``--include_path``), e.g. ``dataset_path: json`` with
``dataset_kwargs: {data_files: {test: items.jsonl}}`` (paths relative to the current directory).
"""

from __future__ import annotations

import argparse
import difflib
import fnmatch
import functools
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.cli import HelpFormatter
from model.loading import add_model_args, lora_arg, model_from_args, weight_arg

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The tasks of MiniMind's README table, by lm-eval's names: its label for each and minimind-3's score (lm-eval acc).
MINIMIND_TABLE: dict[str, tuple[str, float]] = {
    "ceval-valid": ("C-Eval", 24.89),
    "cmmlu": ("CMMLU", 25.38),
    "arc_easy": ("ARC-E", 28.49),
    "piqa": ("PIQA", 50.65),
    "openbookqa": ("OBQA", 23.60),
    "hellaswag": ("HellaSwag", 28.28),
    "social_iqa": ("SIQA", 34.19),
}
INSTALL_HINT = "pip install -r requirements-eval.txt (lm-eval and accelerate)"


class BenchError(ValueError):
    """A request lm-eval cannot serve (unknown task, task data not to be had); the message says what to do."""


def harness_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16) -> HFLM:
    """lm-eval's Hugging Face wrapper around a model already loaded (ours is a PreTrainedModel + GenerationMixin)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)


@functools.cache
def task_manager(include_path: str | None = None) -> TaskManager:
    """lm-eval's index of its ~15k tasks (plus those in ``include_path``); building it takes seconds, so once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(names: list[str], tasks: TaskManager) -> None:
    """Refuse unknown task names at once (before a long run), naming the close ones."""
    for name in names:
        known = name in tasks.all_tasks or Path(name).is_file()
        if not known and any(c in name for c in "*?["):
            known = any(fnmatch.fnmatch(task, name) for task in tasks.all_tasks)
        if not known:
            raise BenchError(f"lm-eval has no task {name!r}; close: {', '.join(close_tasks(name, tasks.all_tasks))} "
                             f"(all: lm_eval ls tasks; own YAMLs: --include_path DIR)")


def close_tasks(name: str, all_tasks: list[str]) -> list[str]:
    """lm-eval's task names nearest to ``name``; MiniMind's labels too ("siqa" -> social_iqa, "ARC-E" -> arc_easy)."""
    def plain(text: str) -> str:
        return re.sub(r"[^a-z0-9]", "", text.lower())

    by_label = [task for task, (label, _) in MINIMIND_TABLE.items() if plain(label) == plain(name)]
    return list(dict.fromkeys(by_label + difflib.get_close_matches(name, all_tasks, n=5, cutoff=0.6))) or ["none"]


def run_tasks(lm: HFLM, names: list[str], tasks: TaskManager, limit: float | None = None,
              num_fewshot: int | None = None, chat_template: bool = False, model_name: str = "model",
              output: str | None = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``names``, samples kept (the table reads chance and item counts off them);
    with ``output``, lm-eval's own files go there: ``<output>/<model_name>/results_*.json`` and ``samples_*.jsonl``."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=output) if output else None
    try:
        results = lm_eval.simple_evaluate(
            model=lm, model_args={"pretrained": model_name}, tasks=names, task_manager=tasks, limit=limit,
            num_fewshot=num_fewshot, apply_chat_template=chat_template, log_samples=True, evaluation_tracker=tracker)
    except ConnectionError as e:  # datasets' answer when the hub is off (offline, not cached) or out of reach
        raise BenchError(f"{e}: the task data comes from the Hugging Face hub; run once with network (a mirror: "
                         "HF_ENDPOINT=https://hf-mirror.com) to fill ~/.cache/huggingface/datasets, or copy that "
                         "folder from a machine that has it; then HF_DATASETS_OFFLINE=1 works") from None
    except RuntimeError as e:
        if "Dataset scripts are no longer supported" not in str(e):
            raise
        raise BenchError(f"{e}: this task's dataset needs a loading script, which datasets>=4 no longer runs; use a "
                         "task whose YAML names data files (lm-eval issue #3171)") from None
    if tracker:
        aggregated = {k: v for k, v in results.items() if k != "samples"}
        tracker.save_results_aggregated(results=aggregated, samples=results["samples"])
        for name in results["configs"]:
            tracker.save_results_samples(task_name=name, samples=results["samples"][name])
    return results


def leaf_tasks(name: str, results: dict[str, Any]) -> list[str]:
    """The tasks whose items make up ``name``: itself, or a group's subtasks (recursively)."""
    children = results["group_subtasks"].get(name)
    return [leaf for child in children for leaf in leaf_tasks(child, results)] if children else [name]


def table_rows(results: dict[str, Any], order: list[str]) -> list[dict[str, Any]]:
    """One row per (task, metric, filter) of the tasks asked for (a group's subtasks fold into the group): score and
    its standard error, chance level and MiniMind's published score, as fractions."""
    scores = {**results["results"], **results.get("groups", {})}
    subtasks = {child for children in results["group_subtasks"].values() for child in children}
    names = [name for name in scores if name not in subtasks]
    names.sort(key=lambda name: order.index(name) if name in order else len(order))
    rows = []
    for name in names:
        leaves = leaf_tasks(name, results)
        items = sum(results["n-samples"][leaf]["effective"] for leaf in leaves)
        chance = None  # a generative task has none
        if all(results["configs"][leaf]["output_type"] == "multiple_choice" for leaf in leaves) and items:
            chance = sum(1 / len(s["arguments"]) for leaf in leaves for s in results["samples"][leaf]) / items
        for key, value in scores[name].items():
            metric, _, kind = key.partition(",")
            if not kind or "_stderr" in metric or not isinstance(value, (int, float)):
                continue  # alias, name, sample counts, and the stderr entries read below
            stderr = scores[name].get(f"{metric}_stderr,{kind}")
            published = MINIMIND_TABLE[name][1] / 100 if name in MINIMIND_TABLE and metric == "acc" else None
            rows.append(dict(task=name, metric=metric, filter=None if kind == "none" else kind, score=value,
                             stderr=stderr if isinstance(stderr, (int, float)) else None, chance=chance,
                             minimind=published, items=items))
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The rows as one Markdown table (percentages), ``title`` above it."""
    def percent(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.2f}"

    lines = [title, "", "| task | metric | score ± stderr | chance | minimind-3 | items |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        task = f"{row['task']} ({MINIMIND_TABLE[row['task']][0]})" if row["task"] in MINIMIND_TABLE else row["task"]
        metric = row["metric"] + (f" ({row['filter']})" if row["filter"] else "")
        score = percent(row["score"]) + ("" if row["stderr"] is None else f" ± {100 * row['stderr']:.2f}")
        lines.append(f"| {task} | {metric} | {score} | {percent(row['chance'])} | {percent(row['minimind'])} | "
                     f"{row['items']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    b = p.add_argument_group("benchmark (评测任务)")
    b.add_argument("--tasks", default=",".join(MINIMIND_TABLE),
                   help=f"lm-eval task names, comma-separated (default: MiniMind's table, {','.join(MINIMIND_TABLE)})")
    b.add_argument("--limit", type=float, default=None,
                   help="score the first N items of each task (a fraction below 1: that share); default all")
    b.add_argument("--num_fewshot", type=int, default=None, help="examples before each question (default: the task's)")
    b.add_argument("--batch_size", type=int, default=16, help="sequences per forward pass (default 16)")
    b.add_argument("--chat_template", action="store_true",
                   help="wrap each question in the tokenizer's chat template (default off: plain text)")
    b.add_argument("--include_path", default=None, help="a folder of your own lm-eval task YAMLs")
    b.add_argument("--output", default=None, help="a folder for lm-eval's results JSON and per-item samples")
    b.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args(argv)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names or args.batch_size < 1 or (args.limit is not None and args.limit <= 0):
        p.error("--tasks must name a task, --batch_size be at least 1, --limit be positive")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    described = weight_arg(args) + (f" + LoRA {lora_arg(args)}" if lora_arg(args) else "")
    try:
        import lm_eval  # checked first: a missing install is one line, not a traceback mid-run
    except ImportError as e:
        sys.exit(f"error: {e.name or 'lm-eval'} is not installed: {INSTALL_HINT}")
    try:
        model, tokenizer = model_from_args(args)
        tasks = task_manager(args.include_path)
        check_tasks(names, tasks)
        results = run_tasks(harness_model(model, tokenizer, args.batch_size), names, tasks, limit, args.num_fewshot,
                            args.chat_template, described, args.output)
    except (FileNotFoundError, ValueError) as e:  # BenchError, CheckpointMismatch and DataError are ValueErrors
        sys.exit(f"error: {e}")
    rows = table_rows(results, names)
    shots = sorted(set(results["n-shot"].values()))
    if args.json:
        print(json.dumps({"model": described, "chat_template": args.chat_template, "num_fewshot": shots,
                          "limit": limit, "rows": rows}, ensure_ascii=False))
        return
    title = (f"**{described}** · lm-eval {lm_eval.__version__} · {'/'.join(map(str, shots))}-shot · chat template "
             f"{'on' if args.chat_template else 'off'}" + (f" · limit {limit}" if limit else ""))
    print(markdown(rows, title))


if __name__ == "__main__":
    main()
