"""Datasets for every training stage: pretrain (packed or padded), SFT and DPO (assistant-only labels).

Nothing here holds a data file in RAM, so multi-GB jsonl files cost the same memory as tiny ones:
- pretrain files are tokenised once into a uint16 token file (np.memmap) + document offsets, cached on disk;
- SFT / DPO files are indexed once (byte offset of every line) and each row is read, rendered with the
  tokenizer's chat template and tokenised lazily in __getitem__.
Caches live in `<dir of the data file>/.cache/` (`~/.cache/minimind-lab/` when that folder is read-only), keyed by
the source file (path, size, mtime), the tokenizer and the format version, written atomically and built by one
process while the others (DDP ranks) wait on a file lock.

Items are dicts of 1-D LongTensors, `input_ids` and `labels` (aligned: the model shifts internally; -100 = no
loss). `pad_collate` batches them.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "dataset"
USER_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minimind-lab"
IGNORE_INDEX = -100
# Bump a kind's version when its cache files would hold something else for the same source and key (another
# layout, other rows or tokens): older caches then stop matching, are rebuilt, and clean_cache.py lists them.
CACHE_VERSIONS = {"tokens": 1, "lines": 2}
TOKENIZE_BATCH_CHARS = 1 << 20  # text per tokenizer call: bounds the build's memory whatever the document sizes
INDEX_FLUSH_ROWS = 1 << 16  # line offsets the indexer holds in RAM before writing them out
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


def _nonblank_lines(path: str | os.PathLike, desc: str | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, 1-based line number, raw bytes) of every line of `path` that is a row, read lazily.

    A blank line (empty, or only whitespace such as spaces, tabs or the "\\r" of a Windows file) is no row but still
    counts for line numbers, so that errors name the line an editor shows. `desc` shows a progress bar.
    """
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=desc,
                                     disable=desc is None) as bar:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield offset, lineno, raw
            offset += len(raw)
            if lineno % PROGRESS_EVERY_LINES == 0:
                bar.update(offset - bar.n)
        bar.update(offset - bar.n)


def _load_json(raw: bytes, where: str) -> Any:
    """Parse one jsonl line; ``where`` (its file:line) names it in the error."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # without the parser's "line 2" (the row's newline), which would contradict file:line
        problem = f"{e.msg} at character {e.pos + 1} of the line" if isinstance(e, json.JSONDecodeError) else str(e)
        raise DataError(f"{where}: malformed JSON ({problem})") from None


def _preview(obj: Any, width: int = 80) -> str:
    text = json.dumps(obj, ensure_ascii=False) if not isinstance(obj, str) else obj
    return text if len(text) <= width else text[:width] + "..."


def _document_text(raw: bytes, where: str) -> str:
    """The text of one pretraining row ``{"text": ...}``."""
    row = _load_json(raw, where)
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{where}: expected an object with a string 'text', got {_preview(row)}")
    if not text.strip():
        raise DataError(f"{where}: empty 'text'")
    return text


def iter_documents(path: str | os.PathLike, skip_bad_lines: bool = False, skipped: list[DataError] | None = None,
                   desc: str | None = None) -> Iterator[str]:
    """The text of every row ``{"text": ...}`` of a pretraining jsonl file, read lazily.

    A bad row raises DataError naming `path:line`; with skip_bad_lines it is logged, appended to `skipped` (when
    given) and passed over instead. `desc` shows a progress bar over the file's bytes.
    """
    for _, lineno, raw in _nonblank_lines(path, desc):
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


# ----------------------------------------------------------------------------------------------------------
# the on-disk cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides token ids (tokenizer.json minus padding/truncation state)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # transformers flips these when a caller asks for padding/truncation: they do not change the ids
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def default_cache_dir(source: Path) -> Path:
    """``<data dir>/.cache``, or a folder in the user's cache when the data sits where nobody may write."""
    beside = source.parent / ".cache"
    if os.access(beside if beside.is_dir() else source.parent, os.W_OK):
        return beside
    return USER_CACHE_DIR


def _cached(source: Path, cache_dir: str | os.PathLike | None, kind: str, key: dict, parts: list[str],
            build: Callable[[dict[str, Path]], dict]) -> tuple[dict[str, Path], dict, bool]:
    """Return ({part: file}, meta, built_now) for a cache of `source`, building it once if needed.

    `build(tmp_files)` writes every part and returns the metadata. Parts are moved into place with os.replace and
    the meta file goes last, so it marks a complete cache: a crash never leaves one that looks valid. A file lock
    (rather than a torch.distributed barrier, whose NCCL timeout a long build could exceed) makes one process
    build while the other ranks wait, then they all map the same files.
    """
    stat = source.stat()
    key = {**key, "source": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
           "kind": kind, "version": CACHE_VERSIONS[kind]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(source)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{source.name}.{kind}.{digest}"
    files = {part: stem.with_name(f"{stem.name}.{part}") for part in parts}
    meta_file = stem.with_name(stem.name + ".meta.json")
    built = False
    with FileLock(str(stem) + ".lock"):
        if not meta_file.is_file():
            tmp = {part: f.with_name(f"{f.name}.tmp{os.getpid()}") for part, f in files.items()}
            try:
                meta = {**build(tmp), "key": key}
                for part, f in files.items():
                    os.replace(tmp[part], f)
                tmp_meta = meta_file.with_name(f"{meta_file.name}.tmp{os.getpid()}")
                tmp_meta.write_text(json.dumps(meta, indent=1))
                os.replace(tmp_meta, meta_file)
                built = True
            finally:
                for f in tmp.values():
                    f.unlink(missing_ok=True)
    return files, json.loads(meta_file.read_text()), built


def stale_caches(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """The caches in ``folder`` that can never be used again, with why: their source file is gone or has changed
    since (size or mtime), or another cache version built them. Another tokenizer's cache of a file is not stale."""
    stale = []
    for meta_file in sorted(Path(folder).glob("*.meta.json")):
        try:
            key = json.loads(meta_file.read_text())["key"]
        except (OSError, ValueError, KeyError):
            continue  # not one of ours
        source = Path(key["source"])
        stat = source.stat() if source.is_file() else None
        current = CACHE_VERSIONS.get(key.get("kind"))
        if key.get("version") != current:
            stale.append((meta_file, f"cache version {key.get('version')} (now {current})"))
        elif stat is None:
            stale.append((meta_file, f"{source} is gone"))
        elif (stat.st_size, stat.st_mtime_ns) != (key["size"], key["mtime_ns"]):
            stale.append((meta_file, f"{source} changed since"))
    return stale


def cache_files(meta_file: Path) -> list[Path]:
    """Every file of the cache that ``meta_file`` describes (its parts, its lock file), the meta file last."""
    stem = meta_file.name.removesuffix(".meta.json")
    return [f for f in sorted(meta_file.parent.glob(glob.escape(stem) + ".*")) if f != meta_file] + [meta_file]


# ----------------------------------------------------------------------------------------------------------
# pretraining


def _text_batches(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Group `texts` into lists of about `max_chars` characters (a longer text makes a batch of its own)."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


class PretrainDataset(Dataset):
    """Plain-text pretraining data: jsonl lines of {"text": ...}.

    mode="pack" (default): all documents, each followed by the document separator `<|endoftext|>`, form one token
      stream cut into rows of exactly max_seq_len tokens (no padding; the tail shorter than a row is dropped).
      Attention crosses document boundaries inside a row, as in GPT-2 / nanoGPT: the separator tells the model a
      new document starts. With doc_mask=True items also carry `position_ids` that restart at every document
      start, and the model then keeps each document's attention to itself (a block-diagonal causal mask).
    mode="pad": one document (+ separator) per row, truncated to max_seq_len, variable length; pad_collate pads.

    The token stream is built once per (file, tokenizer) into `cache_dir` (default `<data dir>/.cache/`) and
    memory-mapped, so switching mode or max_seq_len reuses it. `built_cache` says whether this call built it.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, max_seq_len: int, mode: str = "pack",
                 cache_dir: str | os.PathLike | None = None, skip_bad_lines: bool = False, doc_mask: bool = False):
        if mode not in ("pack", "pad"):
            raise ValueError(f"mode must be 'pack' or 'pad', got {mode!r}")
        self.path, self.max_seq_len, self.mode = Path(path), max_seq_len, mode
        self.doc_mask = doc_mask and mode == "pack"
        if not self.path.is_file():
            raise FileNotFoundError(f"pretrain data not found: {self.path.resolve()}. Download it with: "
                                    + DOWNLOAD_HINT.format(name=self.path.name))
        self.sep_id = tokenizer.get_vocab().get("<|endoftext|>", tokenizer.eos_token_id)
        self.dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
        key = {"tokenizer": tokenizer_fingerprint(tokenizer), "sep_id": self.sep_id,
               "dtype": np.dtype(self.dtype).name, "skip_bad_lines": skip_bad_lines}
        build = lambda tmp: self._tokenize(tmp, tokenizer, skip_bad_lines)  # noqa: E731
        self.files, meta, self.built_cache = _cached(self.path, cache_dir, "tokens", key, ["bin", "docs"], build)
        self.n_tokens, self.n_docs, self.skipped = meta["tokens"], meta["docs"], meta["skipped"]
        if self.skipped:
            log.warning("%s: skipped %d bad line(s) (skip_bad_lines=True)", self.path, self.skipped)
        if mode == "pack" and self.n_tokens < max_seq_len:
            raise DataError(f"{self.path}: {self.n_tokens} tokens, fewer than one row of max_seq_len={max_seq_len}")
        self._tokens = self._doc_ends = None  # mapped lazily, once per process (DataLoader workers)

    def _tokenize(self, tmp: dict[str, Path], tokenizer: Any, skip_bad_lines: bool) -> dict:
        """Build the cache: the token stream (each document + the separator) and each document's end offset in it."""
        skipped: list[DataError] = []
        documents = iter_documents(self.path, skip_bad_lines, skipped, desc=f"tokenizing {self.path.name}")
        n_tokens = n_docs = 0
        with open(tmp["bin"], "wb") as f_bin, open(tmp["docs"], "wb") as f_docs:
            for texts in _text_batches(documents, TOKENIZE_BATCH_CHARS):  # batches: the fast tokenizer is parallel
                ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
                n_tokens = self._append_documents(ids, n_tokens, f_bin, f_docs)
                n_docs += len(ids)
        if n_docs == 0:
            raise DataError(f"{self.path}: no documents")
        return {"tokens": n_tokens, "docs": n_docs, "skipped": len(skipped)}

    def _append_documents(self, ids: list[list[int]], n_tokens: int, f_bin: BinaryIO, f_docs: BinaryIO) -> int:
        """Append documents (each + the separator) to the token file, their end offsets to the docs file; return
        the new number of tokens."""
        stream: list[int] = []
        for doc in ids:
            stream += doc
            stream.append(self.sep_id)
        ends = n_tokens + np.cumsum([len(doc) + 1 for doc in ids], dtype=np.int64)
        f_bin.write(np.asarray(stream, dtype=self.dtype).tobytes())
        f_docs.write(ends.tobytes())
        return int(ends[-1])

    def _map(self) -> None:
        self._tokens = np.memmap(self.files["bin"], dtype=self.dtype, mode="r")
        self._doc_ends = np.memmap(self.files["docs"], dtype=np.int64, mode="r")

    def __getstate__(self) -> dict:
        # never pickle the mapped arrays (spawned workers would copy the whole file); each process maps its own
        return {**self.__dict__, "_tokens": None, "_doc_ends": None}

    def __len__(self) -> int:
        return self.n_tokens // self.max_seq_len if self.mode == "pack" else self.n_docs

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._tokens is None:
            self._map()
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        if self.mode == "pack":
            row = self._tokens[i * self.max_seq_len:(i + 1) * self.max_seq_len]
        else:
            start = int(self._doc_ends[i - 1]) if i else 0
            row = self._tokens[start:min(int(self._doc_ends[i]), start + self.max_seq_len)]
        ids = torch.from_numpy(row.astype(np.int64))
        item = {"input_ids": ids, "labels": ids.clone()}
        if self.doc_mask:
            item["position_ids"] = self._positions(i * self.max_seq_len)
        return item

    def rows_sharing_documents(self, rows: list[int]) -> np.ndarray:
        """A mask over all rows: True where a row holds part of a document that one of ``rows`` holds (``rows``
        included). Packing cuts documents, so a row shares its first and last document with the rows beside it
        (a long document spans several); ``train_eval_split`` keeps those out of training."""
        shared = np.zeros(len(self), dtype=bool)
        if self.mode == "pad":  # a row is a document
            shared[rows] = True
            return shared
        if self._doc_ends is None:
            self._map()
        starts = np.arange(len(self), dtype=np.int64) * self.max_seq_len
        first = np.searchsorted(self._doc_ends, starts, side="right")  # each row's first and last document
        last = np.searchsorted(self._doc_ends, starts + self.max_seq_len - 1, side="right")
        held = np.zeros(self.n_docs + 1, dtype=np.int64)  # +1 at a held-out row's first document, -1 after its last
        np.add.at(held, first[rows], 1)
        np.add.at(held, last[rows] + 1, -1)
        held_docs = np.concatenate([[0], np.cumsum(np.cumsum(held)[:-1] > 0)])  # held-out documents before each
        return held_docs[last + 1] - held_docs[first] > 0

    def _positions(self, row_start: int) -> torch.Tensor:
        """Each token's position within its document; the row's first document counts from the row start."""
        index = np.arange(row_start, row_start + self.max_seq_len)
        doc = np.searchsorted(self._doc_ends, index, side="right")  # doc_ends are exclusive ends
        doc_start = np.where(doc > 0, np.asarray(self._doc_ends)[np.maximum(doc - 1, 0)], 0)
        return torch.from_numpy(index - np.maximum(doc_start, row_start))


# ----------------------------------------------------------------------------------------------------------
# chat data: SFT and DPO


def _line_index(tmp: dict[str, Path], source: Path) -> dict:
    """Write an int64 (n, 2) array of [byte offset, 1-based line number] of every non-blank line of `source`."""
    rows = ((offset, lineno) for offset, lineno, _ in _nonblank_lines(source, desc=f"indexing {source.name}"))
    n_rows = 0
    with open(tmp["lines"], "wb") as out:
        while block := list(islice(rows, INDEX_FLUSH_ROWS)):  # in blocks: a multi-GB file has millions of rows
            np.array(block, dtype=np.int64).tofile(out)
            n_rows += len(block)
    return {"rows": n_rows}


def _json_field(value: Any, what: str, where: str) -> list:
    """MiniMind stores `tools` / `tool_calls` as JSON strings: parse them, so every template sees lists of dicts.
    Empty ("", "null", "[]", null): an empty list."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {what} is not valid JSON ({e})") from None
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where}: {what} must be a list (or a JSON string of one), got {type(value).__name__}")
    return value


def _messages(turns: Any, where: str) -> tuple[list[dict], list | None]:
    """Validate a list of turns; return (messages for apply_chat_template, tools or None)."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected a non-empty list of turns, got {_preview(turns)}")
    messages, tools = [], None
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: turn {k} needs a role of system/user/assistant/tool, got {_preview(turn)}")
        message = dict(turn)
        if message.get("content") is None:
            message["content"] = ""
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: turn {k} content must be a string, got {type(message['content']).__name__}")
        for key in ("tools", "tool_calls"):
            if key in message:
                value = _json_field(message.pop(key), f"turn {k} {key}", where)
                if value:  # an empty one ("", "null", []) is left out: the template would render an empty block
                    message[key] = value
        tools = message.get("tools", tools)
        if reasoning := message.pop("reasoning_content", None):
            if not isinstance(reasoning, str):
                raise DataError(f"{where}: turn {k} reasoning_content must be a string, got {type(reasoning).__name__}")
            message["reasoning_content"] = reasoning
        messages.append(message)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, nothing to learn")
    return messages, tools


LOSS_TURNS = ("all", "last")  # which assistant turns of a conversation are supervised


def final_reply_turns(messages: list[dict]) -> int:
    """How many assistant messages make up the conversation's final reply: the last assistant message and those
    before it back to the last user message (a tool call, the tool's result, the answer: one reply). Tool results
    are context, never supervised, so only the assistant messages are counted."""
    count = 0
    for message in reversed(messages):
        if message["role"] == "assistant":
            count += 1
        elif message["role"] != "tool" and count:  # a user or system turn ends the final reply
            break
    return count


class _ChatRows(Dataset):
    """Lazy access to the rows of a chat jsonl file, and the chat template rendering with assistant-only labels.

    Every assistant turn is supervised from just after `<|im_start|>assistant\\n` up to and including its
    `<|im_end|>` (reasoning and tool calls included: they are inside the turn); the "\\n" after it is template
    glue that generation never produces, so it is not. System, user and tool turns are never supervised.

    `loss_turns="last"` supervises the final reply only (`final_reply_turns`: its thinking and tool calls included);
    earlier assistant turns become context like the user's.

    Rows longer than `max_seq_len` tokens are cut. With `skip_bad_lines` a bad row is logged and replaced by the
    next good one instead of raising DataError. The line index is cached in `cache_dir` (default
    `<data dir>/.cache/`); tokens and labels are not (rows are encoded as they are read).
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, max_seq_len: int, skip_bad_lines: bool = False,
                 cache_dir: str | os.PathLike | None = None, loss_turns: str = "all"):
        if loss_turns not in LOSS_TURNS:
            raise ValueError(f"loss_turns must be one of {', '.join(LOSS_TURNS)}, got {loss_turns!r}")
        self.path, self.tokenizer, self.max_seq_len = Path(path), tokenizer, max_seq_len
        self.skip_bad_lines, self.skipped, self.loss_turns = skip_bad_lines, 0, loss_turns
        if not self.path.is_file():
            raise FileNotFoundError(f"data file not found: {self.path.resolve()}. Download it with: "
                                    + DOWNLOAD_HINT.format(name=self.path.name))
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the ChatML tokens {missing}; SFT/DPO labels need them")
        self.end_id = vocab["<|im_end|>"]
        # An assistant turn opens with <|im_start|> "assistant" and a token starting with "\n" (some tokenizers
        # merge that newline with the reply's first characters, so match the newline by its decoded text).
        self.head = [vocab["<|im_start|>"]] + tokenizer.encode("assistant", add_special_tokens=False)
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        self.newline_ids = {i for i, piece in enumerate(pieces) if piece.startswith("\n")}
        self.files, meta, _ = _cached(self.path, cache_dir, "lines", {}, ["lines"],
                                      lambda tmp: _line_index(tmp, self.path))
        self.n_rows = meta["rows"]
        self._lines, self._file, self._pid = None, None, None
        self._check_template()

    def _check_template(self) -> None:
        """Fail at start-up, not mid-epoch, if the chat template does not render ChatML assistant turns."""
        turns = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
        enc = self.encode_turns(turns, where="template check", max_seq_len=10**9)
        supervised = enc["input_ids"][enc["labels"] != IGNORE_INDEX].tolist()
        if not supervised or supervised[-1] != self.end_id:
            raise ValueError("the tokenizer's chat template does not render assistant turns as "
                             "'<|im_start|>assistant\\n...<|im_end|>' (ChatML): cannot find what to supervise")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lines": None, "_file": None, "_pid": None}

    def __len__(self) -> int:
        return self.n_rows

    def _row(self, i: int) -> tuple[Any, str]:
        """Read and parse row i; the file is opened once per process (DataLoader workers fork or spawn)."""
        if self._pid != os.getpid():
            self._lines = np.memmap(self.files["lines"], dtype=np.int64, mode="r").reshape(-1, 2)
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        offset, lineno = (int(x) for x in self._lines[i])
        where = f"{self.path}:{lineno}"
        self._file.seek(offset)
        return _load_json(self._file.readline(), where), where

    def encode_turns(self, turns: Any, where: str, max_seq_len: int | None = None) -> dict[str, torch.Tensor]:
        """Render turns with the chat template, tokenise, label the assistant tokens, truncate.

        The labels are found on the whole row, then cut with it: truncation only ever removes a tail, so every
        supervised token keeps its prompt, a reply cut short keeps its supervised prefix, and "the final reply" is
        the conversation's, not whatever the cut leaves last."""
        messages, tools = _messages(turns, where)
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception as e:  # a template error without file:line would be opaque mid-epoch
            raise DataError(f"{where}: the chat template cannot render this row ({type(e).__name__}: {e})") from e
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        spans = self._assistant_spans(ids)
        if self.loss_turns == "last":
            spans = spans[-final_reply_turns(messages):]
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        cut = max_seq_len or self.max_seq_len
        return {"input_ids": torch.tensor(ids[:cut]), "labels": torch.tensor(labels[:cut])}

    def _assistant_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """One linear scan: [start, end) of each assistant turn's tokens, from after its header through the next
        <|im_end|> (or the end of ``ids``)."""
        spans = []
        head, n, i = self.head, len(ids), 0
        while i < n:
            if ids[i] != head[0]:
                i += 1
                continue
            body = i + len(head)
            if ids[i:body] != head or body >= n or ids[body] not in self.newline_ids:
                i += 1
                continue
            start = end = body + 1
            while end < n and ids[end] != self.end_id:
                end += 1
            end = min(end + 1, n)  # include <|im_end|>
            spans.append((start, end))
            i = end
        return spans

    def encode_row(self, row: Any, where: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        for step in range(len(self)):  # with skip_bad_lines, a bad row is replaced by the next good one
            try:
                row, where = self._row((i + step) % len(self))
                return self.encode_row(row, where)
            except DataError as e:
                if not self.skip_bad_lines:
                    raise
                self.skipped += 1  # counted per process: each DataLoader worker logs its own
                log.warning("skipping %s (%d skipped in this process)", e, self.skipped)
        raise DataError(f"{self.path}: no usable row")


class SFTDataset(_ChatRows):
    """Chat SFT data: jsonl lines of {"conversations": [{"role": ..., "content": ...}, ...]}.

    Handles MiniMind2 rows (optional system turn, user/assistant turns) and minimind-3 rows (a system turn with
    `tools`, assistant `tool_calls` and `reasoning_content`, `tool` turns), all rendered by the tokenizer's chat
    template. Rows are truncated to max_seq_len tokens; a row whose first reply lies beyond the cut has no
    supervised token (all labels -100): the loss must not divide by zero tokens.
    """

    def encode_row(self, row: Any, where: str) -> dict[str, torch.Tensor]:
        if not isinstance(row, dict) or "conversations" not in row:
            raise DataError(f"{where}: expected an object with a 'conversations' key, got {_preview(row)}")
        return self.encode_turns(row["conversations"], where)


class DPODataset(_ChatRows):
    """Preference data: jsonl lines of {"chosen": [turns], "rejected": [turns]} (same turn format as SFT).

    Items hold chosen_input_ids / chosen_labels / rejected_input_ids / rejected_labels, labels masked like SFT
    (sequence log-probs are sums or means over the tokens whose label is not -100).
    """

    def encode_row(self, row: Any, where: str) -> dict[str, torch.Tensor]:
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            raise DataError(f"{where}: expected an object with 'chosen' and 'rejected' keys, got {_preview(row)}")
        item = {}
        for side in ("chosen", "rejected"):
            enc = self.encode_turns(row[side], f"{where} ({side})")
            item[f"{side}_input_ids"], item[f"{side}_labels"] = enc["input_ids"], enc["labels"]
        return item


# ----------------------------------------------------------------------------------------------------------
# batching and splitting


def pad_collate(batch: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad every key of a list of items to one common length: `*labels` with -100, the rest with pad_id.

    One length for all keys lets a DPO step concatenate chosen and rejected into one forward pass. No attention
    mask is needed: padding is on the right and attention is causal, so real tokens never see pad tokens, and
    pad positions carry no loss. (Do not derive a mask from `input_ids != pad_id`: the document separator of
    pretraining is id 0 too.)
    """
    length = max(x.numel() for item in batch for x in item.values())
    out = {}
    for key in batch[0]:
        fill = IGNORE_INDEX if key.endswith("labels") else pad_id
        padded = torch.full((len(batch), length), fill, dtype=torch.long)
        for row, item in enumerate(batch):
            padded[row, :item[key].numel()] = item[key]
        out[key] = padded
    return out


def train_eval_split(dataset: Dataset, eval_fraction: float | None = None, eval_size: int | None = None,
                     seed: int = 0) -> tuple[Subset, Subset]:
    """A deterministic held-out split: (train, eval) Subsets; give eval_fraction or eval_size.

    The eval rows are a random sample. Where rows cut documents (packed pretraining), training leaves out every
    row that shares a document with an eval row, so the eval loss is on text the model has not seen."""
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction or eval_size")
    n = len(dataset)
    n_eval = eval_size if eval_size is not None else max(1, round(n * eval_fraction))
    if not 0 < n_eval < n:
        raise ValueError(f"eval size {n_eval} must be between 1 and {n - 1} for a dataset of {n} items")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out, train = order[:n_eval], order[n_eval:]
    if hasattr(dataset, "rows_sharing_documents"):
        shared = dataset.rows_sharing_documents(held_out)
        train = [i for i in train if not shared[i]]
    return Subset(dataset, train), Subset(dataset, held_out)
