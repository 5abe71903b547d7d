"""Chat data for SFT and DPO: jsonl rows of turns, rendered by the tokenizer's chat template, assistant-only labels.

Each file is indexed once (byte offset of every line, cached on disk); each row is read, rendered and tokenised lazily
in __getitem__, so a multi-GB file costs the memory of a tiny one.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.batching import IGNORE_INDEX
from dataset.cache import cached, line_index
from dataset.files import DOWNLOAD_HINT, DataError, load_json, preview
from dataset.long_text import max_token_chars, safe_cut

log = logging.getLogger(__name__)


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
        raise DataError(f"{where}: expected a non-empty list of turns, got {preview(turns)}")
    messages, tools = [], None
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: turn {k} needs a role of system/user/assistant/tool, got {preview(turn)}")
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


def _prompt(messages: list[dict]) -> list[dict]:
    """Everything before the last assistant turn."""
    last = max(k for k, message in enumerate(messages) if message["role"] == "assistant")
    return messages[:last]


def _turn_order(raw: bytes) -> str | None:
    """What is unusual about the order of a row's turns (two user turns in a row, or an assistant turn first, after
    any system turn), or None. A row that cannot be read is left to __getitem__, which says what is wrong with it."""
    try:
        row = json.loads(raw)
    except ValueError:
        return None
    for key in ("conversations", "chosen", "rejected"):
        turns = row.get(key) if isinstance(row, dict) else None
        if not isinstance(turns, list):
            continue
        roles = [turn.get("role") for turn in turns if isinstance(turn, dict) and turn.get("role") != "system"]
        if roles[:1] == ["assistant"]:
            return f"{key}: an assistant turn first"
        if any(a == b == "user" for a, b in zip(roles, roles[1:])):
            return f"{key}: two user turns in a row"
    return None


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
        self.max_token_chars, self.added_tokens = max_token_chars(tokenizer), tokenizer.get_added_vocab()
        self.files, meta, _ = cached(self.path, cache_dir, "lines", {}, ["lines"],
                                     lambda tmp: line_index(tmp, self.path, _turn_order))
        self.n_rows = meta["rows"]
        if meta["noted"]:
            examples = ", ".join(f"{self.path}:{line} ({why})" for line, why in meta["noted_examples"])
            log.warning("%s: %d row(s) with turns out of the usual order are used as they are, e.g. %s", self.path,
                        meta["noted"], examples)
        self._lines, self._file, self._pid = None, None, None
        self._check_template()

    def _check_template(self) -> None:
        """Fail at start-up, not mid-epoch, if the chat template does not render ChatML assistant turns (one per
        assistant message, which is how loss_turns="last" finds the final reply's)."""
        turns = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                 {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
        ids = self.encode_turns(turns, where="template check", max_seq_len=10**9)["input_ids"].tolist()
        spans = self._assistant_spans(ids)
        if len(spans) != 2 or any(ids[end - 1] != self.end_id for _, end in spans):
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
        return load_json(self._file.readline(), where), where

    def encode_turns(self, turns: Any, where: str, max_seq_len: int | None = None,
                     empty_think: bool = False) -> dict[str, torch.Tensor]:
        """Render turns with the chat template, tokenise, truncate, and label the assistant tokens. ``empty_think``:
        assistant turns without reasoning show an empty ``<think>`` block, as minimind-3 renders every turn."""
        messages, tools = _messages(turns, where)
        if empty_think:
            for message in messages:
                if message["role"] == "assistant":
                    message.setdefault("reasoning_content", "")  # the template shows "" as an empty block
        return self.encode_messages(messages, tools, where, max_seq_len)

    def encode_messages(self, messages: list[dict], tools: list | None, where: str, max_seq_len: int | None = None) \
            -> dict[str, torch.Tensor]:
        max_seq_len = max_seq_len or self.max_seq_len
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        except Exception as e:  # a template error without file:line would be opaque mid-epoch
            raise DataError(f"{where}: the chat template cannot render this row ({type(e).__name__}: {e})") from e
        ids = self.tokenizer(self._head(text, max_seq_len), add_special_tokens=False)["input_ids"][:max_seq_len]
        spans = self._assistant_spans(ids)
        if self.loss_turns == "last":  # the template renders one span per assistant message (_check_template)
            spans = spans[sum(m["role"] == "assistant" for m in messages) - final_reply_turns(messages):]
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}

    def _head(self, text: str, max_seq_len: int) -> str:
        """The start of ``text`` that tokenises to the first max_seq_len tokens of the whole, so that a huge row
        (read every epoch) is not tokenised whole: a 50 MB one took 9.8 GB. A token covers at most max_token_chars
        characters, so the first max_seq_len tokens lie within max_seq_len * max_token_chars characters, and text
        cut at a safe cut after them tokenises to the same tokens up to the cut (dataset/long_text.py). A text with
        no safe cut past that point (no space, newline or punctuation: not prose) is tokenised whole."""
        reach = max_seq_len * self.max_token_chars
        cut = safe_cut(text, reach, len(text), self.added_tokens) if len(text) > reach else None
        return text if cut is None else text[:cut]

    def _assistant_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """One linear scan: [start, end) of each assistant turn's tokens, from after its header through the next
        <|im_end|> (or the end of ``ids``).

        Truncation only ever removes a tail, so every supervised token keeps its prompt; a reply cut short keeps
        its supervised prefix, and a header cut short supervises nothing.
        """
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

    def check_first_row(self) -> None:
        """Encode the first row, whatever skip_bad_lines says: a file of another kind (DPO pairs where SFT rows are
        expected) is refused at start-up, naming its file:line, rather than mid-epoch."""
        self.encode_row(*self._row(0))

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
    supervised token (all labels IGNORE_INDEX): the loss must not divide by zero tokens.

    ``empty_think_ratio``: the share of rows whose replies without reasoning show an empty ``<think>`` block (the
    rest show none), so one model learns to answer after a closed block (open_thinking false) as well as after a
    plain ``<|im_start|>assistant``. minimind-3 keeps them in 20% of its rows. Which rows is drawn from each row's
    file:line, so every epoch and every resume renders a row the same way.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any, max_seq_len: int, skip_bad_lines: bool = False,
                 cache_dir: str | os.PathLike | None = None, empty_think_ratio: float = 0.0, loss_turns: str = "all"):
        if not 0 <= empty_think_ratio <= 1:
            raise ValueError(f"empty_think_ratio is a share of rows, between 0 and 1, not {empty_think_ratio}")
        super().__init__(path, tokenizer, max_seq_len, skip_bad_lines, cache_dir, loss_turns)
        self.empty_think_ratio = empty_think_ratio
        if empty_think_ratio and "<think>" not in self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": ""}],
                tokenize=False):
            raise ValueError("empty_think_ratio needs a chat template that shows an empty reasoning_content as an "
                             "empty <think> block (model/chat_template.jinja does); this tokenizer's does not")

    def encode_row(self, row: Any, where: str) -> dict[str, torch.Tensor]:
        if not isinstance(row, dict) or "conversations" not in row:
            raise DataError(f"{where}: expected an object with a 'conversations' key, got {preview(row)}")
        empty_think = random.Random(where).random() < self.empty_think_ratio
        return self.encode_turns(row["conversations"], where, empty_think=empty_think)


class DPODataset(_ChatRows):
    """Preference data: jsonl lines of {"chosen": [turns], "rejected": [turns]} (same turn format as SFT).

    Items hold chosen_input_ids / chosen_labels / rejected_input_ids / rejected_labels, labels masked like SFT
    (sequence log-probs are sums or means over the tokens whose label is not IGNORE_INDEX).
    """

    def encode_row(self, row: Any, where: str) -> dict[str, torch.Tensor]:
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            raise DataError(f"{where}: expected an object with 'chosen' and 'rejected' keys, got {preview(row)}")
        sides = {side: _messages(row[side], f"{where} ({side})") for side in ("chosen", "rejected")}
        if _prompt(sides["chosen"][0]) != _prompt(sides["rejected"][0]):
            raise DataError(f"{where}: chosen and rejected differ before their last assistant turn; a preference pair "
                            f"compares two replies to one prompt")
        item = {}
        for side, (messages, tools) in sides.items():
            enc = self.encode_messages(messages, tools, f"{where} ({side})")
            item[f"{side}_input_ids"], item[f"{side}_labels"] = enc["input_ids"], enc["labels"]
        return item
