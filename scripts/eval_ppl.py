r"""Score a model on a jsonl file: loss per token, perplexity and bits per byte.  在数据上评测：困惑度与每字节比特数。

    python scripts/eval_ppl.py --weight pretrain --data_path dataset/demo/pretrain.jsonl --held_out 64
    python scripts/eval_ppl.py --weight full_sft --data_path dataset/demo/sft.jsonl --held_out 32
    # MiniMind's weights with MiniMind's tokenizer, on the same rows:
    python scripts/eval_ppl.py --weight ~/Downloads/full_sft_512.pth --tokenizer path/to/minimind/model \
        --data_path dataset/demo/sft.jsonl --held_out 32

Text files (``{"text": ...}``) are scored as pretraining sees them: the documents packed into rows of
``--max_seq_len`` tokens (``--pad``, ``--doc_mask``: as the trainer's flags), every next token counted. Chat files
(``{"conversations": [...]}``) are scored as SFT sees them: the assistant turns only. ``--held_out N`` scores exactly
the rows a trainer held out with ``--eval_size N`` (same ``--seed``, ``--max_seq_len``, ``--pad``, ``--doc_mask``),
so it reproduces the training log's eval loss.

Perplexity depends on the tokenizer (a larger vocabulary has more tokens to choose from, and fewer tokens per text);
bits per byte does not: the loss over all scored tokens divided by the UTF-8 bytes they spell, so models with
different tokenizers (ours, MiniMind's) compare on the same text: the same conversations of a chat file, or a whole
text file (packed rows, and so held-out rows, of two tokenizers hold different text). Tokens that spell no text
(``<|im_end|>``, the document separator) count in the loss and perplexity but not in bits per byte.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import (IGNORE_INDEX, DataError, PretrainDataset, SFTDataset, pad_collate, resolve_data_path,
                     train_eval_split)
from model.cli import HelpFormatter
from model.loading import add_model_args, model_from_args


BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback: one raw byte


def token_bytes(tokenizer: Any) -> torch.Tensor:
    """How many UTF-8 bytes each token id spells; 0 for added tokens (``<|im_end|>``, ``<think>``, ...). A byte-level
    BPE vocabulary (ours, MiniMind's, GPT-2's) writes each byte as one character; a SentencePiece one (Llama's)
    writes a space as ``▁`` and an odd byte as ``<0xNN>``."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    byte_level = (backend.get("decoder") or {}).get("type") == "ByteLevel"
    added = set(tokenizer.added_tokens_decoder)
    lengths = torch.zeros(len(tokenizer), dtype=torch.long)
    for token, i in tokenizer.get_vocab().items():
        if i in added:
            continue
        if byte_level:
            lengths[i] = len(token)
        else:
            lengths[i] = 1 if BYTE_TOKEN.fullmatch(token) else len(token.replace("▁", " ").encode())
    return lengths


def rows_of(path: str, tokenizer: Any, max_seq_len: int, cache_dir: str | None, pad: bool = False,
            doc_mask: bool = False) -> Dataset:
    """The file's rows as a trainer builds them: pretraining rows for ``{"text"}`` files, SFT rows for chats."""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        raise DataError(f"{path} has no rows")
    try:
        row = json.loads(first)
    except ValueError:
        raise DataError(f"{path}: the first row is not JSON") from None
    if isinstance(row, dict) and "text" in row:
        return PretrainDataset(path, tokenizer, max_seq_len, mode="pad" if pad else "pack", cache_dir=cache_dir,
                               doc_mask=doc_mask)
    if isinstance(row, dict) and "conversations" in row:
        return SFTDataset(path, tokenizer, max_seq_len, cache_dir=cache_dir)
    raise DataError(f"{path}: expected rows of {{\"text\": ...}} or {{\"conversations\": [...]}} (DPO pairs are "
                    "scored by train_dpo.py's eval)")


@torch.no_grad()
def score(model: torch.nn.Module, rows: Dataset, byte_lengths: torch.Tensor, batch_size: int = 8,
          progress: bool = False) -> dict[str, float]:
    """Loss per scored token (nats), perplexity and bits per byte of ``model`` on ``rows`` (items with ``input_ids``
    and ``labels``; a label of IGNORE_INDEX is not scored)."""
    device = next(model.parameters()).device
    nats = torch.zeros((), dtype=torch.float64)
    nats_with_text = torch.zeros((), dtype=torch.float64)
    tokens = text_bytes = 0
    loader = DataLoader(rows, batch_size=batch_size, collate_fn=pad_collate)
    for batch in tqdm(loader, desc="scoring", disable=not progress):
        positions = batch["position_ids"].to(device) if "position_ids" in batch else None  # --doc_mask
        logits = model(input_ids=batch["input_ids"].to(device), position_ids=positions).logits[:, :-1].float()
        targets = batch["labels"][:, 1:].to(device)  # the logits at t score the token at t + 1
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
        scored = targets.flatten() != IGNORE_INDEX
        sizes = byte_lengths.to(device)[targets.flatten().clamp(min=0)] * scored
        nats += loss.sum().double().cpu()
        nats_with_text += (loss * (sizes > 0)).sum().double().cpu()
        tokens += int(scored.sum())
        text_bytes += int(sizes.sum())
    if tokens == 0:
        raise DataError("no token to score (every reply cut off by --max_seq_len?)")
    loss = float(nats) / tokens
    return {"rows": len(rows), "tokens": tokens, "bytes": text_bytes, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": float(nats_with_text) / math.log(2) / max(text_bytes, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    d = p.add_argument_group("data (评测数据)")
    d.add_argument("--data_path", default="dataset/demo/pretrain.jsonl",
                   help="a jsonl file of text or chats (default: the bundled demo text)")
    d.add_argument("--max_seq_len", type=int, default=256, help="as the model was trained (default 256, the demo's)")
    d.add_argument("--pad", action="store_true", help="text: one document per row, as the trainer's --pad")
    d.add_argument("--doc_mask", action="store_true", help="text: attention within documents, as --doc_mask")
    d.add_argument("--held_out", type=int, default=0,
                   help="score only the N rows a trainer holds out with --eval_size N (default 0: every row)")
    d.add_argument("--seed", type=int, default=42, help="the trainer's --seed, for --held_out (default 42)")
    d.add_argument("--max_rows", type=int, default=0, help="score the first N rows only (default 0: all)")
    d.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (default 8)")
    d.add_argument("--cache_dir", default=None, help="where the token cache goes (default: beside the data)")
    d.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    args = p.parse_args(argv)
    if args.max_seq_len < 2 or args.batch_size < 1 or args.held_out < 0 or args.max_rows < 0:
        p.error("--max_seq_len must be at least 2, --batch_size at least 1, --held_out and --max_rows not negative")
    try:
        path = str(resolve_data_path(args.data_path, [], ""))
        model, tokenizer = model_from_args(args)
        if args.max_seq_len > model.config.max_position_embeddings:
            p.error(f"--max_seq_len {args.max_seq_len}: the model has {model.config.max_position_embeddings} positions")
        rows = rows_of(path, tokenizer, args.max_seq_len, args.cache_dir, args.pad, args.doc_mask)
        if args.held_out:
            if args.held_out >= len(rows):
                p.error(f"--held_out {args.held_out}: the data has {len(rows)} rows (text: packed rows of "
                        f"--max_seq_len tokens), and a trainer holds out fewer")
            rows = train_eval_split(rows, eval_size=args.held_out, seed=args.seed)[1]
        if args.max_rows:
            rows = torch.utils.data.Subset(rows, range(min(args.max_rows, len(rows))))
        result = score(model, rows, token_bytes(tokenizer), args.batch_size, progress=sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as e:  # DataError and CheckpointMismatch are ValueErrors
        sys.exit(f"error: {e}")
    if args.json:
        print(json.dumps({"data": path, **result}))
        return
    print(f"{path}: {result['rows']} rows, {result['tokens']:,} tokens scored, {result['bytes']:,} bytes of text")
    print(f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.2f} | "
          f"bits per byte {result['bits_per_byte']:.4f}")


if __name__ == "__main__":
    main()
