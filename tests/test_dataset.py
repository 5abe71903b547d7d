"""Datasets: assistant-only SFT/DPO labels, pretrain packing and the memmap cache, bad-row errors, batching."""

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import dataset.cache as cache
import dataset.files as data_files
from dataset import (DataError, DPODataset, PretrainDataset, SFTDataset, pad_collate, resolve_data_path,
                     train_eval_split)

MODEL_DIR = Path(__file__).resolve().parents[1] / "model"
DEMO_DIR = Path(__file__).resolve().parents[1] / "dataset" / "demo"
IGN = -100

# ChatML with the minimind-3 extras, small enough to read: tools in the system turn, <think> reasoning,
# <tool_call> blocks, tool results as a user turn wrapping <tool_response>.
TEMPLATE = """\
{%- for m in messages -%}
{%- if m.role == 'system' -%}
<|im_start|>system
{{ m.content }}{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}<|im_end|>
{% elif m.role == 'assistant' -%}
<|im_start|>assistant
{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}\
{% for c in m.tool_calls or [] %}<tool_call>{{ c | tojson }}</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' -%}
<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% else -%}
<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif -%}
{%- endfor -%}"""

CORPUS = ["You are a helpful assistant. What is the weather in Paris today?", "It is sunny, 20 degrees.",
          "user assistant system tool think tool_call tool_response get_weather city arguments name",
          "你好，世界。今天天气很好。", "Once upon a time there was a tiny model that learned to talk."]


def make_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in milliseconds, with MiniMind's special ids 0/1/2 and a ChatML template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels built piece by piece: (text, supervised?)."""
    all_ids, labels = [], []
    for text, supervised in pieces:
        piece = ids(tok, text)
        all_ids += piece
        labels += piece if supervised else [IGN] * len(piece)
    return all_ids, labels


def supervised_texts(tok, item: dict, prefix: str = "") -> list[str]:
    """Decode each contiguous run of supervised tokens."""
    runs, current = [], []
    for i, label in zip(item[prefix + "input_ids"].tolist(), item[prefix + "labels"].tolist()):
        if label != IGN:
            assert label == i  # labels are aligned with input_ids; the model shifts
            current.append(i)
        elif current:
            runs.append(tok.decode(current)), current.clear()
    return runs + ([tok.decode(current)] if current else [])


CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the weather?"}, {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "In Paris?"}, {"role": "assistant", "content": "20 degrees in Paris."}]
CHAT_PIECES = [("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the "
                "weather?<|im_end|>\n<|im_start|>assistant\n", False), ("It is sunny.<|im_end|>", True),
               ("\n<|im_start|>user\nIn Paris?<|im_end|>\n<|im_start|>assistant\n", False),
               ("20 degrees in Paris.<|im_end|>", True), ("\n", False)]


# ---------------------------------------------------------------------------------------------------- SFT


def test_sft_labels_are_exactly_the_assistant_turns(tok, tmp_path):
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CHAT}]), tok, max_seq_len=512)
    want_ids, want_labels = expected(tok, CHAT_PIECES)
    item = ds[0]
    assert item["input_ids"].dtype == torch.long and item["input_ids"].tolist() == want_ids
    assert item["labels"].tolist() == want_labels


def test_sft_tool_call_row(tok, tmp_path):
    tools = [{"name": "get_weather", "parameters": {"city": "string"}}]
    call = [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    row = {"conversations": [  # as stored in minimind-3 files: tools / tool_calls are JSON strings
        {"role": "system", "content": "You are a helpful assistant.", "tools": json.dumps(tools)},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": json.dumps(call), "reasoning_content": "Need a tool."},
        {"role": "tool", "content": '{"city": "Paris", "weather": "sunny"}'},
        {"role": "assistant", "content": "It is sunny."}]}
    item = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [row]), tok, max_seq_len=512)[0]
    text = tok.decode(item["input_ids"])
    assert "<tools>" in text and "<tool_response>" in text
    assert supervised_texts(tok, item) == [
        f"<think>Need a tool.</think><tool_call>{json.dumps(call[0])}</tool_call><|im_end|>", "It is sunny.<|im_end|>"]


def test_sft_empty_tool_fields_render_as_absent_and_bad_reasoning_is_named(tok, tmp_path):
    plain = {"conversations": CHAT}
    empties = [{"conversations": [{**turn, "tool_calls": empty, "tools": empty, "reasoning_content": None}
                                  for turn in CHAT]} for empty in ("", "null", " ", [], None)]
    bad = {"conversations": [CHAT[0], {**CHAT[1], "reasoning_content": 5}]}
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [plain, *empties, bad]), tok, max_seq_len=512)
    for i in range(1, 6):
        assert ds[i]["input_ids"].tolist() == ds[0]["input_ids"].tolist()
    with pytest.raises(DataError, match=r"sft\.jsonl:7: turn 1 reasoning_content must be a string, got int"):
        ds[6]


def test_sft_truncation(tok, tmp_path):
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CHAT}]), tok, max_seq_len=512)
    full_ids, full_labels = expected(tok, CHAT_PIECES)
    first_reply_end = len(ids(tok, CHAT_PIECES[0][0] + CHAT_PIECES[1][0]))
    second_header_end = first_reply_end + len(ids(tok, CHAT_PIECES[2][0]))
    for cut in (3, first_reply_end - 2, first_reply_end + 4, second_header_end - 1, second_header_end + 2):
        ds.max_seq_len = cut
        item = ds[0]
        assert item["input_ids"].tolist() == full_ids[:cut]
        assert item["labels"].tolist() == full_labels[:cut]  # a cut reply keeps its prefix, nothing else appears
    ds.max_seq_len = 3  # cut inside the first prompt: nothing supervised
    assert (ds[0]["labels"] == IGN).all()


# Three exchanges; the third is answered through a tool: think + tool call, the tool's result, then the answer.
TOOL_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
THREE_TURNS = [
    {"role": "system", "content": "You are a helpful assistant.", "tools": [{"name": "get_weather"}]},
    {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "What is the weather?"},
    {"role": "assistant", "content": "Where?", "reasoning_content": "No city."},
    {"role": "user", "content": "In Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need a tool.", "tool_calls": [TOOL_CALL]},
    {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]


def three_turn_pieces(loss_turns: str) -> list[tuple[str, bool]]:
    earlier = loss_turns == "all"  # "last": the first two replies are context, the final one (both parts) learned
    tools = '<tools>{"name": "get_weather"}</tools>'
    return [(f"<|im_start|>system\nYou are a helpful assistant.{tools}<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
             "<|im_start|>assistant\n", False), ("Hi!<|im_end|>", earlier),
            ("\n<|im_start|>user\nWhat is the weather?<|im_end|>\n<|im_start|>assistant\n", False),
            ("<think>No city.</think>Where?<|im_end|>", earlier),
            ("\n<|im_start|>user\nIn Paris?<|im_end|>\n<|im_start|>assistant\n", False),
            (f"<think>Need a tool.</think><tool_call>{json.dumps(TOOL_CALL)}</tool_call><|im_end|>", True),
            ("\n<|im_start|>user\n<tool_response>sunny</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
            ("It is sunny.<|im_end|>", True), ("\n", False)]


@pytest.mark.parametrize("loss_turns", ["all", "last"])
def test_loss_turns_labels_token_by_token(tok, tmp_path, loss_turns):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": THREE_TURNS}])
    item = SFTDataset(path, tok, max_seq_len=512, loss_turns=loss_turns)[0]
    want_ids, want_labels = expected(tok, three_turn_pieces(loss_turns))
    assert item["input_ids"].tolist() == want_ids
    assert item["labels"].tolist() == want_labels


def test_loss_turns_last_under_truncation(tok, tmp_path):
    """The final reply is the conversation's: a cut that removes it leaves nothing supervised (not the turn before)."""
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": THREE_TURNS}])
    ds = SFTDataset(path, tok, max_seq_len=512, loss_turns="last")
    want_ids, want_labels = expected(tok, three_turn_pieces("last"))
    call_start = next(i for i, label in enumerate(want_labels) if label != IGN)
    for cut in (call_start - 1, call_start + 3, len(want_ids) - 2):
        ds.max_seq_len = cut
        assert ds[0]["labels"].tolist() == want_labels[:cut]
    ds.max_seq_len = call_start - 1
    assert (ds[0]["labels"] == IGN).all()
    with pytest.raises(ValueError, match="loss_turns must be one of all, last"):
        SFTDataset(path, tok, max_seq_len=512, loss_turns="first")


def test_sft_errors_name_file_and_line(tok, tmp_path):
    good = {"conversations": CHAT}
    path = write_jsonl(tmp_path / "sft.jsonl", [good, "", "{not json", {"messages": []}, good,
                                                {"conversations": [{"role": "user", "content": 3}]},
                                                {"conversations": [{"role": "user", "content": "hi"}]}])
    ds = SFTDataset(path, tok, max_seq_len=512)
    assert len(ds) == 6  # the empty line is no row, but line numbers still count it
    for index, line, what in [(1, 3, "malformed JSON"), (2, 4, "'conversations'"), (4, 6, "content must be"),
                              (5, 7, "no assistant turn")]:
        with pytest.raises(DataError, match=rf"sft\.jsonl:{line}: .*{what}"):
            ds[index]
    skipping = SFTDataset(path, tok, max_seq_len=512, skip_bad_lines=True)
    assert skipping[1]["input_ids"].tolist() == ds[0]["input_ids"].tolist()  # replaced by the next good row
    assert skipping.skipped == 2


def test_sft_rows_with_turns_out_of_order_are_reported_and_used(tok, tmp_path, caplog):
    user, reply = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    system = {"role": "system", "content": "be kind"}
    rows = [[user, reply], [user, user, reply], [system, reply, user, reply], [system, user, reply], [reply, user, reply]]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": r} for r in rows])
    for _ in range(2):  # counted while indexing, reported by every run (the second one reads the cached index)
        caplog.clear()
        ds = SFTDataset(path, tok, max_seq_len=64)
        assert f"{path}: 3 row(s) with turns out of the usual order" in caplog.text
        assert (f"{path}:2 (conversations: two user turns in a row), {path}:3 (conversations: an assistant turn "
                f"first), {path}:5 (conversations: an assistant turn first)") in caplog.text
        assert len(ds) == 5 and all((ds[i]["labels"] != IGN).any() for i in range(5))  # used as they are


def test_json_error_says_at_once(tok, tmp_path):
    path = tmp_path / "pre.jsonl"
    path.write_text('{"text": "a\tb"}\n')  # a raw tab inside a JSON string
    with pytest.raises(DataError) as err:
        PretrainDataset(path, tok, 4)
    assert "malformed JSON (Invalid control character at character 12 of the line)" in str(err.value)


def test_blank_lines_of_spaces_or_carriage_returns_are_not_rows(tok, tmp_path, monkeypatch):
    """A Windows-edited file (\\r\\n, blank lines "\\r\\n") and lines of spaces: every real row, right line numbers,
    also when the index is written out in blocks of a few rows."""
    good = json.dumps({"conversations": CHAT})
    lines = [good, " " * 40, "\r", good, "", " \t \r", "   " + good, good, "  "]  # rows at lines 1, 4, 7 and 8
    path = tmp_path / "sft.jsonl"
    path.write_bytes("\r\n".join(lines).encode())
    for block_rows in (1 << 16, 1, 3):
        monkeypatch.setattr(cache, "INDEX_FLUSH_ROWS", block_rows)
        ds = SFTDataset(path, tok, max_seq_len=512, cache_dir=tmp_path / f"cache{block_rows}")
        assert np.fromfile(ds.files["lines"], np.int64).reshape(-1, 2)[:, 1].tolist() == [1, 4, 7, 8]
        assert all(ds[i]["input_ids"].tolist() == ds[0]["input_ids"].tolist() for i in range(4))


def test_bad_template_fails_at_start(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    with pytest.raises(ValueError, match="ChatML"):
        SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CHAT}]), tok, max_seq_len=64)


def test_template_error_names_the_row(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE.replace("{{ m.content }}", "{{ m.content }}{% if m.content == 'boom' %}"
                                         "{{ raise_exception('cannot render') }}{% endif %}")
    path = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CHAT[:3]},
                                                {"conversations": [{"role": "user", "content": "boom"}, CHAT[2]]}])
    with pytest.raises(DataError, match=r"sft\.jsonl:2: the chat template cannot render"):
        SFTDataset(path, tok, max_seq_len=64)[1]


def test_dpo_masks(tok, tmp_path):
    prompt = [{"role": "user", "content": "What is the weather?"}]
    row = {"chosen": prompt + [{"role": "assistant", "content": "It is sunny."}],
           "rejected": prompt + [{"role": "assistant", "content": "No."}]}
    item = DPODataset(write_jsonl(tmp_path / "dpo.jsonl", [row, {"chosen": row["chosen"]}]), tok, 128)[0]
    assert set(item) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}
    assert supervised_texts(tok, item, "chosen_") == ["It is sunny.<|im_end|>"]
    assert supervised_texts(tok, item, "rejected_") == ["No.<|im_end|>"]
    with pytest.raises(DataError, match=r"dpo\.jsonl:2: .*'rejected'"):
        DPODataset(tmp_path / "dpo.jsonl", tok, 128)[1]
    batch = pad_collate([item, item])
    assert {v.shape for v in batch.values()} == {(2, item["chosen_input_ids"].numel())}  # one common length
    assert (batch["rejected_labels"][:, item["rejected_labels"].numel():] == IGN).all()


def test_dpo_pair_with_two_prompts_is_refused_or_skipped(tok, tmp_path):
    def pair(chosen_prompt: str, rejected_prompt: str) -> dict:
        return {side: [{"role": "user", "content": prompt}, {"role": "assistant", "content": side}]
                for side, prompt in (("chosen", chosen_prompt), ("rejected", rejected_prompt))}

    system = [{"role": "system", "content": "be brief"}]
    two_turns = {side: system + turns for side, turns in pair("same", "same").items()}
    two_turns["rejected"] = two_turns["rejected"][1:]  # no system turn: another prompt
    path = write_jsonl(tmp_path / "dpo.jsonl", [pair("same", "same"), pair("What?", "Why?"), two_turns,
                                                pair("ok", "ok")])
    ds = DPODataset(path, tok, 128)
    for i in (1, 2):
        with pytest.raises(DataError, match=rf"dpo\.jsonl:{i + 1}: chosen and rejected differ before their last "
                                            r"assistant turn"):
            ds[i]
    skipping = DPODataset(path, tok, 128, skip_bad_lines=True)
    assert skipping[1]["chosen_input_ids"].tolist() == ds[3]["chosen_input_ids"].tolist() and skipping.skipped == 2


def test_workers_read_rows_lazily(tok, tmp_path):
    rows = [{"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", rows), tok, 64)
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=pad_collate)
    seen = [tok.decode(row[row != IGN]) for batch in loader for row in batch["labels"]]
    assert seen == [f"a{i}<|im_end|>" for i in range(8)]


# ---------------------------------------------------------------------------------------------------- pretrain

DOCS = [f"Document {i}: " + "once upon a time there was a tiny model. " * (i % 5 + 1) for i in range(40)]


def test_pack_keeps_every_token_once_in_order(tok, tmp_path):
    ds = PretrainDataset(write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS]), tok, max_seq_len=32)
    stream = [t for d in DOCS for t in ids(tok, d) + [0]]  # <|endoftext|> (id 0) after each document
    rows = [ds[i] for i in range(len(ds))]
    assert all(r["input_ids"].shape == (32,) and torch.equal(r["input_ids"], r["labels"]) for r in rows)
    assert torch.cat([r["input_ids"] for r in rows]).tolist() == stream[:len(rows) * 32]
    assert len(stream) - len(rows) * 32 < 32  # only a tail shorter than one row is dropped
    assert ds.n_docs == len(DOCS) and ds.n_tokens == len(stream)


def test_doc_mask_positions_restart_after_every_separator(tok, tmp_path):
    ds = PretrainDataset(write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS]), tok, 32, doc_mask=True)
    restarts = 0
    for i in range(len(ds)):
        row, pos = ds[i]["input_ids"].tolist(), ds[i]["position_ids"].tolist()
        assert pos[0] == 0  # a row's first (possibly cut) document counts from the row start
        for t in range(1, 32):
            expected = 0 if row[t - 1] == 0 else pos[t - 1] + 1  # id 0 (<|endoftext|>) ends a document
            assert pos[t] == expected, (i, t)
            restarts += pos[t] == 0
    assert restarts >= len(DOCS) // 2
    assert "position_ids" not in PretrainDataset(ds.path, tok, 32)[0]  # off by default


def row_documents(ds: PretrainDataset, row: int) -> set[int]:
    """The documents a row holds part of (a row is a document in pad mode)."""
    if ds.mode == "pad":
        return {row}
    ds[0]  # maps the files
    ends, start = np.asarray(ds._doc_ends), row * ds.max_seq_len
    return set(range(np.searchsorted(ends, start, "right"), np.searchsorted(ends, start + ds.max_seq_len - 1, "right")
                     + 1))


def assert_no_document_both_trained_on_and_held_out(ds: PretrainDataset, train, held) -> set[int]:
    """...and that only rows sharing a document with a held-out row are left out; returns the left-out rows."""
    held_docs = set().union(*(row_documents(ds, r) for r in held.indices))
    assert not any(row_documents(ds, r) & held_docs for r in train.indices)
    left_out = set(range(len(ds))) - set(train.indices) - set(held.indices)
    assert all(row_documents(ds, r) & held_docs for r in left_out)
    return left_out


def test_no_document_is_both_trained_on_and_held_out(tok, tmp_path):
    """Packing cuts documents: the training rows that share one with a held-out row are left out, and no others."""
    long_docs = DOCS + ["a long story " * 40] * 3  # a few documents that span several rows
    for mode in ("pack", "pad"):
        ds = PretrainDataset(write_jsonl(tmp_path / f"{mode}.jsonl", [{"text": d} for d in long_docs]), tok, 16,
                             mode=mode)
        train, held = train_eval_split(ds, eval_size=5, seed=1)
        left_out = assert_no_document_both_trained_on_and_held_out(ds, train, held)
        assert (mode == "pad") == (not left_out)


def test_held_out_rows_pass_over_an_enormous_document(tok, tmp_path, caplog):
    """One document spans most rows: holding out any of its rows would leave it all out of training (454,000 rows of
    455,000 once). The held-out rows come from the other documents, and the run output says so."""
    docs = DOCS[:20] + ["an enormous story " * 1500] + DOCS[20:]
    ds = PretrainDataset(write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in docs]), tok, 16)
    enormous = [r for r in range(len(ds)) if 20 in row_documents(ds, r)]
    assert len(enormous) > 0.8 * len(ds)
    for seed in range(3):
        train, held = train_eval_split(ds, eval_size=5, seed=seed)
        left_out = assert_no_document_both_trained_on_and_held_out(ds, train, held)
        assert len(held) == 5 and not set(held.indices) & set(enormous)
        assert len(left_out) <= 8 * 5  # the cap: LEFT_OUT_PER_HELD_OUT per held-out row
        assert "passed over" in caplog.text
    only_it = PretrainDataset(write_jsonl(tmp_path / "one.jsonl", [{"text": docs[20]}]), tok, 16)
    caplog.clear()
    train, held = train_eval_split(only_it, eval_size=2)  # none fits: one row, and the caller stops (no training row)
    assert len(held) == 1 and len(train) == 0 and "1 of the 2 rows asked for are held out, one that" in caplog.text


def test_pad_mode_one_document_per_row(tok, tmp_path):
    ds = PretrainDataset(write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS]), tok, 24, mode="pad")
    assert len(ds) == len(DOCS)
    for i in (0, 1, 39):
        assert ds[i]["input_ids"].tolist() == (ids(tok, DOCS[i]) + [0])[:24]
    batch = pad_collate([ds[0], ds[1]])
    n0 = ds[0]["input_ids"].numel()
    assert batch["input_ids"].shape == (2, 24) and n0 < 24
    assert (batch["labels"][0, n0:] == IGN).all() and (batch["input_ids"][0, n0:] == 0).all()
    assert batch["labels"][0, n0 - 1] == 0  # the document's own separator keeps its label


def test_cache_reused_and_invalidated(tok, tmp_path):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    first = PretrainDataset(path, tok, 32)
    assert first.built_cache and first.files["bin"].parent == tmp_path / ".cache"
    mtime = first.files["bin"].stat().st_mtime_ns
    again = PretrainDataset(path, tok, 16, mode="pad")  # other mode and length: same token stream
    assert not again.built_cache and again.files == first.files
    assert first.files["bin"].stat().st_mtime_ns == mtime
    write_jsonl(path, [{"text": d} for d in DOCS[:10]])  # the source changed
    changed = PretrainDataset(path, tok, 32)
    assert changed.built_cache and changed.n_docs == 10
    other_tok = PretrainDataset(path, make_tokenizer(vocab_size=300), 32)  # the tokenizer changed
    assert other_tok.built_cache and other_tok.files["bin"] != changed.files["bin"]
    assert not list((tmp_path / ".cache").glob("*.tmp*"))


def test_data_in_a_read_only_folder_is_cached_in_the_users_cache(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    real_access = os.access
    monkeypatch.setattr(cache.os, "access", lambda p, mode: p != tmp_path and real_access(p, mode))  # root may write all
    monkeypatch.setattr(cache, "USER_CACHE_DIR", tmp_path / "user-cache")
    assert PretrainDataset(path, tok, 32).files["bin"].parent == tmp_path / "user-cache"
    assert SFTDataset(write_jsonl(tmp_path / "sft.jsonl", [{"conversations": CHAT}]), tok, 64).files["lines"].parent \
        == tmp_path / "user-cache"


def test_clean_cache_removes_only_caches_that_can_never_be_used_again(tok, tmp_path, capsys):
    from scripts.clean_cache import main as clean_cache

    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    gone = write_jsonl(tmp_path / "gone.jsonl", [{"text": d} for d in DOCS])
    old = PretrainDataset(path, tok, 32).files
    PretrainDataset(gone, tok, 32)
    gone.unlink()
    write_jsonl(path, [{"text": d} for d in DOCS[:10]])  # the source changed: a new cache is built beside the old
    new = PretrainDataset(path, tok, 32).files
    other_tokenizer = PretrainDataset(path, make_tokenizer(vocab_size=300), 32).files
    cache = tmp_path / ".cache"
    clean_cache(["--cache_dir", str(cache)])  # lists, deletes nothing
    out = capsys.readouterr().out
    assert out.count("STALE") == 2 and "changed since" in out and "is gone" in out and "--delete" in out
    assert all(f.exists() for f in old.values())
    clean_cache(["--cache_dir", str(cache), "--delete"])
    assert not any(f.exists() for f in old.values()) and not list(cache.glob("gone.jsonl.*"))
    assert all(f.exists() for f in [*new.values(), *other_tokenizer.values()])
    assert "freed" in capsys.readouterr().out
    assert PretrainDataset(path, tok, 32).built_cache is False  # the valid cache still serves


def _build_in_process(path, cache_dir, queue):
    queue.put(PretrainDataset(path, make_tokenizer(), 32, cache_dir=cache_dir).built_cache)


def test_concurrent_processes_build_once(tmp_path):
    path = write_jsonl(tmp_path / "pre.jsonl", [{"text": d} for d in DOCS])
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(path, tmp_path / "c", queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(queue.get(timeout=5) for _ in procs) == [False, True]


def test_pretrain_bad_lines(tok, tmp_path):
    rows = [{"text": "good one"}, "[1, 2", {"txt": "x"}, {"text": 5}, {"text": "  "}, {"text": "good two"}]
    path = write_jsonl(tmp_path / "pre.jsonl", rows)
    for line in range(2, 6):
        path.write_text("\n".join(json.dumps(r) if not isinstance(r, str) else r for r in [rows[0], rows[line - 1]]))
        with pytest.raises(DataError, match=r"pre\.jsonl:2: (malformed JSON|.*'text')"):
            PretrainDataset(path, tok, 4, mode="pad")
    write_jsonl(path, rows)
    ds = PretrainDataset(path, tok, 4, mode="pad", skip_bad_lines=True)
    assert ds.skipped == 4 and len(ds) == 2
    with pytest.raises(FileNotFoundError, match="download_data.py"):
        PretrainDataset(tmp_path / "missing.jsonl", tok, 4)


# ---------------------------------------------------------------------------------------------------- helpers


def test_pad_collate_sft():
    a = {"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([IGN, 6, 7])}
    b = {"input_ids": torch.tensor([8]), "labels": torch.tensor([8])}
    batch = pad_collate([a, b], pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["labels"].tolist() == [[IGN, 6, 7], [8, IGN, IGN]]


def test_train_eval_split_is_deterministic():
    data = list(range(100))
    train, held = train_eval_split(data, eval_fraction=0.1, seed=3)
    assert len(held) == 10 and sorted(train.indices + held.indices) == data
    assert train_eval_split(data, eval_fraction=0.1, seed=3)[1].indices == held.indices
    assert len(train_eval_split(data, eval_size=7)[1]) == 7
    with pytest.raises(ValueError):
        train_eval_split(data)


def test_resolve_data_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_files, "DATA_DIR", tmp_path / "dataset")
    monkeypatch.setattr(data_files, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        resolve_data_path("dataset/sft_t2t_mini.jsonl", [], "sft.jsonl")
    assert str(tmp_path / "dataset" / "sft_t2t_mini.jsonl") in str(err.value)
    assert "python scripts/download_data.py sft_t2t_mini.jsonl" in str(err.value)

    demo = write_jsonl((tmp_path / "dataset" / "demo").mkdir(parents=True) or tmp_path / "dataset/demo/sft.jsonl", [])
    assert resolve_data_path(None, ["sft_t2t_mini.jsonl", "sft_mini_512.jsonl"], "sft.jsonl") == demo
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "sft_mini_512.jsonl" in out and "download_data.py" in out and str(demo) in out

    old = write_jsonl(tmp_path / "dataset" / "sft_mini_512.jsonl", [])
    assert resolve_data_path(None, ["sft_t2t_mini.jsonl", "sft_mini_512.jsonl"], "sft.jsonl") == old
    monkeypatch.chdir(old.parent)  # relative: current dir first, then the repo root
    assert resolve_data_path("sft_mini_512.jsonl", [], "x") == old
    assert resolve_data_path("dataset/sft_mini_512.jsonl", [], "x") == old


# ------------------------------------------------------------------------------------------------ the real tokenizer

needs_tokenizer = pytest.mark.skipif(not (MODEL_DIR / "tokenizer.json").is_file(),
                                     reason="model/tokenizer.json absent")


@needs_tokenizer
def test_real_tokenizer_chat_rows(tmp_path):
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    call = [{"name": "get_weather", "arguments": {"city": "北京"}}]
    rows = [{"conversations": CHAT},
            {"conversations": [
                {"role": "system", "content": "你是助手", "tools": json.dumps([{"name": "get_weather"}])},
                {"role": "user", "content": "北京天气?"},
                {"role": "assistant", "content": "", "tool_calls": json.dumps(call), "reasoning_content": "查天气"},
                {"role": "tool", "content": '{"temp": 20}'}, {"role": "assistant", "content": "\n20度。"}]}]
    ds = SFTDataset(write_jsonl(tmp_path / "sft.jsonl", rows), tok, 512)
    assert supervised_texts(tok, ds[0]) == ["It is sunny.<|im_end|>", "20 degrees in Paris.<|im_end|>"]
    first, second = supervised_texts(tok, ds[1])
    assert "查天气" in first and '"get_weather"' in first and first.endswith("</tool_call><|im_end|>")
    assert second == "\n20度。<|im_end|>"
    assert "temp" not in "".join(supervised_texts(tok, ds[1]))


@needs_tokenizer
@pytest.mark.parametrize("name, cls", [("pretrain.jsonl", PretrainDataset), ("sft.jsonl", SFTDataset),
                                       ("lora_identity.jsonl", SFTDataset), ("dpo.jsonl", DPODataset)])
def test_demo_files_load(name, cls, tmp_path):
    if not (DEMO_DIR / name).is_file():
        pytest.skip(f"dataset/demo/{name} absent")
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    ds = cls(DEMO_DIR / name, tok, 512, cache_dir=tmp_path)  # the cache stays out of the repo
    for i in range(min(len(ds), 50)):
        for key, labels in ds[i].items():
            if key.endswith("labels"):
                assert (labels != IGN).any(), f"{name} row {i}: nothing supervised"
