"""Where the data files are and how their rows are read: MiniMind's file catalogue, --data_path resolution, and the
lazy jsonl reader whose errors name file:line."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "dataset"
PROGRESS_EVERY_LINES = 4096  # a progress bar update per line slows reading by ~40%
DOWNLOAD_HINT = "python scripts/download_data.py {name}; --list shows every file"
# MiniMind's published data files (ModelScope gongjy/minimind_dataset, HF jingyaogong/minimind_dataset).
# name: (approximate size, what it is for). Sizes are as published by MiniMind and only shown to help you
# choose: the check after download uses the exact size the server announces.
KNOWN_FILES = {
    # minimind-3 (current)
    "pretrain_t2t_mini.jsonl": ("1.2 GB", "pretrain, recommended start ({'text'})"),
    "pretrain_t2t.jsonl": ("10 GB", "pretrain, full set"),
    "sft_t2t_mini.jsonl": ("1.6 GB", "SFT, recommended (max_seq_len ~768; tools, tool calls, reasoning)"),
    "sft_t2t.jsonl": ("14 GB", "SFT, full set"),
    "dpo.jsonl": ("53 MB", "DPO preference pairs ({'chosen', 'rejected'})"),
    "rlaif.jsonl": ("24 MB", "prompts for RLAIF (PPO/GRPO)"),
    "agent_rl.jsonl": ("?", "agentic RL prompts (tool use)"),
    "agent_rl_math.jsonl": ("?", "agentic RL prompts (math)"),
    # MiniMind2 (older names that tutorials use)
    "pretrain_hq.jsonl": ("1.6 GB", "MiniMind2 pretrain"),
    "sft_mini_512.jsonl": ("1.2 GB", "MiniMind2 SFT, recommended (max_seq_len 512)"),
    "sft_512.jsonl": ("7.5 GB", "MiniMind2 SFT, full, 512 tokens"),
    "sft_1024.jsonl": ("5.6 GB", "MiniMind2 SFT, 1024 tokens"),
    "sft_2048.jsonl": ("9 GB", "MiniMind2 SFT, 2048 tokens"),
    "r1_mix_1024.jsonl": ("340 MB", "MiniMind2 reasoning distillation (R1 style)"),
    "rlaif-mini.jsonl": ("1 MB", "MiniMind2 RLAIF prompts"),
    "lora_identity.jsonl": ("23 KB", "LoRA demo: the model's self-introduction"),
    "lora_medical.jsonl": ("34 MB", "LoRA demo: medical Q&A"),
}


# ----------------------------------------------------------------------------------------------------------
# finding files


def is_demo_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of the small files bundled in ``dataset/demo/``."""
    return Path(path).resolve().parent == (DATA_DIR / "demo").resolve()


def resolve_data_path(data_path: str | os.PathLike | None, default_names: list[str], demo_file: str) -> Path:
    """Turn --data_path into an existing file.

    An explicit path must exist (relative paths: current dir first, then the repo root). With no path, the first
    of `default_names` found in `<repo>/dataset/` wins (old and new MiniMind names), else the bundled demo file
    `dataset/demo/<demo_file>` is used and one line says so.
    """
    if data_path is not None:
        path = Path(data_path).expanduser()
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
        for candidate in candidates:
            if candidate.is_file():
                return candidate.resolve()
        tried = " or ".join(dict.fromkeys(str(c.resolve()) for c in candidates))  # the same path once
        get = DOWNLOAD_HINT.format(name=path.name) if path.name in KNOWN_FILES else \
            "python scripts/download_data.py --list shows MiniMind's files"
        raise FileNotFoundError(f"data file not found: looked for {tried}. {get}")
    for name in default_names:
        if (DATA_DIR / name).is_file():
            return DATA_DIR / name
    demo = DATA_DIR / "demo" / demo_file
    looked = ", ".join(str(DATA_DIR / n) for n in default_names)
    if not demo.is_file():
        raise FileNotFoundError(f"no data: looked for {looked} and the demo file {demo}. Download with: "
                                + DOWNLOAD_HINT.format(name=default_names[0]))
    print(f"[data] none of {looked} found (download: {DOWNLOAD_HINT.format(name=default_names[0])}); "
          f"using the bundled demo file {demo}")
    return demo


# ----------------------------------------------------------------------------------------------------------
# reading jsonl files


class DataError(ValueError):
    """A data row that cannot be used; the message names the file and the 1-based line number."""


def nonblank_lines(path: str | os.PathLike, desc: str | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, 1-based line number, raw bytes) of every line of `path` that is a row, read lazily.

    A blank line (empty, or only whitespace such as spaces, tabs or the "\\r" of a Windows file) is no row but still
    counts for line numbers, so that errors name the line an editor shows. `desc` shows a progress bar.
    """
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=desc,
                                     disable=desc is None) as bar:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            if not raw.isspace():  # (not raw.strip(), which copies a huge line)
                yield offset, lineno, raw
            offset += len(raw)
            if lineno % PROGRESS_EVERY_LINES == 0:
                bar.update(offset - bar.n)
        bar.update(offset - bar.n)


def load_json(raw: bytes, where: str) -> Any:
    """Parse one jsonl line; ``where`` (its file:line) names it in the error."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # without the parser's "line 2" (the row's newline), which would contradict file:line; some of its messages
        # end in " at" already ("Invalid control character at")
        problem = f"{e.msg.removesuffix(' at')} at character {e.pos + 1} of the line" \
            if isinstance(e, json.JSONDecodeError) else str(e)
        raise DataError(f"{where}: malformed JSON ({problem})") from None


def preview(obj: Any, width: int = 80) -> str:
    text = json.dumps(obj, ensure_ascii=False) if not isinstance(obj, str) else obj
    return text if len(text) <= width else text[:width] + "..."


def _document_text(raw: bytes, where: str) -> str:
    """The text of one pretraining row ``{"text": ...}``."""
    row = load_json(raw, where)
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{where}: expected an object with a string 'text', got {preview(row)}")
    if not text.strip():
        raise DataError(f"{where}: empty 'text'")
    return text


def iter_documents(path: str | os.PathLike, skip_bad_lines: bool = False, skipped: list[DataError] | None = None,
                   desc: str | None = None) -> Iterator[str]:
    """The text of every row ``{"text": ...}`` of a pretraining jsonl file, read lazily.

    A bad row raises DataError naming `path:line`; with skip_bad_lines it is logged, appended to `skipped` (when
    given) and passed over instead. `desc` shows a progress bar over the file's bytes.
    """
    for _, lineno, raw in nonblank_lines(path, desc):
        try:
            text = _document_text(raw, f"{path}:{lineno}")
        except DataError as e:
            if not skip_bad_lines:
                raise
            log.warning("skipping %s", e)
            if skipped is not None:
                skipped.append(e)
            continue
        yield text
