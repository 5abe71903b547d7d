"""Huge rows: tokenised in pieces (pretraining) or cut before tokenising (chat), with the tokens of the whole row and
the memory of a normal corpus."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import dataset.pretrain as pretrain
from dataset import PretrainDataset, SFTDataset
from dataset.long_text import safe_cut, text_pieces
from tests.test_dataset import MODEL_DIR, make_tokenizer, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
# words, spaces, newlines, punctuation, CJK, digits, added tokens, a combining accent: joined without separators
ATOMS = ["the", "cat", "Once", " ", "  ", "\n", "\n\n", "\t", ",", ".", "'s", "(", "_", "-", "你好", "世界", "，", "。",
         "123", "4", "é", "e\u0301", "<|im_end|>", "<think>", "</think>"]
PROSE = ("Once upon a time there was a tiny model that learned to talk, slowly (very slowly).\n"
         "你好，世界。今天天气很好！ It's 20 degrees_today; the end.\n")


TOKENIZERS = {"test": make_tokenizer()}  # GPT-2's split regex, as the project's
if (MODEL_DIR / "tokenizer.json").is_file():
    TOKENIZERS["project"] = AutoTokenizer.from_pretrained(MODEL_DIR)


def tokens(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_text_cut_at_a_safe_cut_tokenises_as_the_whole(name):
    tok = TOKENIZERS[name]
    rng = random.Random(0)
    added = tok.get_added_vocab()
    checked = unsafe_differ = 0
    for _ in range(300):
        text = "".join(rng.choice(ATOMS) for _ in range(30))
        cut = safe_cut(text, 0, len(text), added)
        while cut is not None:
            assert tokens(tok, text[:cut]) + tokens(tok, text[cut:]) == tokens(tok, text), (text, cut)
            checked += 1
            cut = safe_cut(text, cut + 1, len(text), added)
        anywhere = rng.randrange(1, len(text))  # the control: an arbitrary cut does change tokens
        unsafe_differ += tokens(tok, text[:anywhere]) + tokens(tok, text[anywhere:]) != tokens(tok, text)
    assert checked > 1000 and unsafe_differ > 30


def test_a_long_document_is_tokenised_in_pieces_with_the_tokens_of_the_whole(tmp_path, monkeypatch):
    tok = make_tokenizer()
    long_doc = PROSE * 200
    monkeypatch.setattr(pretrain, "DOCUMENT_PIECE_CHARS", 256)
    pieces = list(text_pieces(long_doc, 256, tok.get_added_vocab()))
    assert "".join(pieces) == long_doc and len(pieces) > 50 and max(map(len, pieces)) <= 256
    docs = ["A short one.", long_doc, "Another short one."]
    ds = PretrainDataset(write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in docs]), tok, 16, mode="pad")
    whole = [tokens(tok, d) + [0] for d in docs]
    assert ds.n_docs == 3 and ds.n_tokens == sum(map(len, whole))
    ds._map()
    assert ds._tokens.tolist() == [t for doc in whole for t in doc]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_long_chat_row_keeps_the_tokens_of_the_whole_row(name, tmp_path):
    tok = TOKENIZERS[name]
    rows = [{"conversations": [{"role": "user", "content": PROSE * 300}, {"role": "assistant", "content": "ok"}]},
            {"conversations": [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": PROSE * 300}]}]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    cut, whole = SFTDataset(path, tok, 64), SFTDataset(path, tok, 64)
    whole.max_token_chars = 10**9  # no cut: the whole row is tokenised, then truncated
    for i, row in enumerate(rows):
        text = tok.apply_chat_template(row["conversations"], tokenize=False)
        assert len(cut._head(text, 64)) < len(text) / 4  # tokenised: a head of the row, not all of it
        assert cut[i]["input_ids"].tolist() == whole[i]["input_ids"].tolist() == tokens(tok, text)[:64]
        assert cut[i]["labels"].tolist() == whole[i]["labels"].tolist()


MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
from dataset import PretrainDataset, SFTDataset
from tests.test_dataset import make_tokenizer

kind, folder = sys.argv[1], Path(sys.argv[2])
tok = make_tokenizer()
peaks = {}
for corpus in ("normal", "huge"):  # the normal corpus first: the huge row's peak must not rise far above it
    if kind == "pretrain":
        PretrainDataset(folder / f"{corpus}.jsonl", tok, 256, cache_dir=folder / corpus)
    else:
        rows = SFTDataset(folder / f"{corpus}.jsonl", tok, 256, cache_dir=folder / corpus)
        for i in range(3):
            rows[i % len(rows)]
    peaks[corpus] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
print(json.dumps(peaks))
"""


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_a_huge_row_costs_about_the_memory_of_a_normal_corpus(kind, tmp_path):
    """A 4 MB row: tokenised whole it raised the peak by ~700 MB (a 50 MB one by 9 GB); now by a few MB."""
    huge_mb, normal_rows = 4, 1000  # the normal corpus: ~1.5 MB, over one tokenizer batch

    def row(text: str) -> dict:
        if kind == "pretrain":
            return {"text": text}
        return {"conversations": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}

    write_jsonl(tmp_path / "normal.jsonl", [row(PROSE * 10) for _ in range(normal_rows)])
    write_jsonl(tmp_path / "huge.jsonl", [row(PROSE * (huge_mb * 10**6 // len(PROSE.encode())))])
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind, str(tmp_path)], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    peaks = json.loads(probe.stdout)
    assert peaks["huge"] - peaks["normal"] < 10 * huge_mb, peaks
