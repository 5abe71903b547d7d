"""Pretraining data: jsonl rows of {"text": ...}, tokenised once into a memory-mapped token stream."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.cache import cached, tokenizer_fingerprint
from dataset.files import DOWNLOAD_HINT, DataError, iter_documents
from dataset.long_text import text_pieces

log = logging.getLogger(__name__)

TOKENIZE_BATCH_CHARS = 1 << 20  # text per tokenizer call: bounds the build's memory whatever the document sizes
# A tokenizer holds ~100 bytes per character of the text it works on, and is slower per character on long texts
# (2x at 64K characters): longer documents are tokenised in pieces of this many characters
DOCUMENT_PIECE_CHARS = 1 << 12


def _document_pieces(documents: Iterable[str], max_chars: int, added_tokens: Collection[str]) \
        -> Iterator[tuple[str, bool]]:
    """Every document as pieces of at most `max_chars` characters that tokenise as the whole document does
    (``text_pieces``), each with whether it ends its document."""
    for text in documents:
        pieces = text_pieces(text, max_chars, added_tokens)
        piece = next(pieces)
        for following in pieces:
            yield piece, False
            piece = following
        yield piece, True


def _text_batches(pieces: Iterable[tuple[str, bool]], max_chars: int) -> Iterator[list[tuple[str, bool]]]:
    """Group `pieces` into lists of at most `max_chars` characters (a longer piece makes a list of its own)."""
    batch, chars = [], 0
    for piece in pieces:
        if batch and chars + len(piece[0]) > max_chars:
            yield batch
            batch, chars = [], 0
        batch.append(piece)
        chars += len(piece[0])
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
        self.files, meta, self.built_cache = cached(self.path, cache_dir, "tokens", key, ["bin", "docs"], build)
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
        # a huge document is tokenised piece by piece: whole, a 50 MB one took 9 GB of RAM
        pieces = _document_pieces(documents, DOCUMENT_PIECE_CHARS, tokenizer.get_added_vocab())
        n_tokens = n_docs = 0
        with open(tmp["bin"], "wb") as f_bin, open(tmp["docs"], "wb") as f_docs:
            for batch in _text_batches(pieces, TOKENIZE_BATCH_CHARS):  # batches: the fast tokenizer is parallel
                texts, ends_document = zip(*batch)
                ids = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
                n_tokens, n_ended = self._append_pieces(ids, ends_document, n_tokens, f_bin, f_docs)
                n_docs += n_ended
        if n_docs == 0:
            raise DataError(f"{self.path}: no documents")
        return {"tokens": n_tokens, "docs": n_docs, "skipped": len(skipped)}

    def _append_pieces(self, ids: list[list[int]], ends_document: Iterable[bool], n_tokens: int, f_bin: BinaryIO,
                       f_docs: BinaryIO) -> tuple[int, int]:
        """Append the tokens of document pieces (the separator after a document's last piece) to the token file,
        each ended document's end offset to the docs file; return the new number of tokens and of ended documents."""
        stream: list[int] = []
        ends: list[int] = []
        for piece, ends_doc in zip(ids, ends_document):
            stream += piece
            if ends_doc:
                stream.append(self.sep_id)
                ends.append(n_tokens + len(stream))
        f_bin.write(np.asarray(stream, dtype=self.dtype).tobytes())
        f_docs.write(np.asarray(ends, dtype=np.int64).tobytes())
        return n_tokens + len(stream), len(ends)

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

    def shared_row_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """For each row, the first and the last row that hold part of a document it holds (itself included).
        Packing cuts documents, so a row shares its first and last document with the rows beside it, and a long
        document spans many; ``train_eval_split`` keeps the rows that share one with a held-out row out of training."""
        rows = np.arange(len(self), dtype=np.int64)
        if self.mode == "pad":  # a row is a document
            return rows, rows
        if self._doc_ends is None:
            self._map()
        ends, length = np.asarray(self._doc_ends), self.max_seq_len
        first = np.searchsorted(ends, rows * length, side="right")  # each row's first and last document
        last = np.searchsorted(ends, rows * length + length - 1, side="right")
        first_doc_start = np.where(first > 0, ends[np.maximum(first - 1, 0)], 0)
        return first_doc_start // length, np.minimum((ends[last] - 1) // length, len(self) - 1)

    def _positions(self, row_start: int) -> torch.Tensor:
        """Each token's position within its document; the row's first document counts from the row start."""
        index = np.arange(row_start, row_start + self.max_seq_len)
        doc = np.searchsorted(self._doc_ends, index, side="right")  # doc_ends are exclusive ends
        doc_start = np.where(doc > 0, np.asarray(self._doc_ends)[np.maximum(doc - 1, 0)], 0)
        return torch.from_numpy(index - np.maximum(doc_start, row_start))

