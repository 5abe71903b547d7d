"""scripts/eval_ppl.py: bits per byte counts the text's bytes exactly, a uniform model scores ln V, and --held_out
reproduces the eval loss a training run logged."""

import json
import math
import random

import pytest
import torch

from dataset import SFTDataset
from model import MiniMindConfig, MiniMindForCausalLM
from model.loading import load_tokenizer
from model.weights import save_weights
from scripts.eval_ppl import main, rows_of, score, token_bytes
from tests.test_eval_llm import needs_tokenizer
from trainer import Stage, build_parser, train
from trainer.train_pretrain import pretrain_data

pytestmark = needs_tokenizer
SHAPE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def test_token_bytes_add_up_to_the_texts_utf8_bytes(tok):
    lengths = token_bytes(tok)
    for text in ["Hello, world!", "天空为什么是蓝色的？", "def f(x):\n    return x ** 2  # 🚀", "ünïcödé café"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert int(lengths[ids].sum()) == len(text.encode()), text
    assert lengths[tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<think>"])].tolist() == [0, 0, 0]


def test_a_uniform_model_scores_ln_v_and_only_assistant_tokens_count(tok, tmp_path):
    model = MiniMindForCausalLM(MiniMindConfig(**SHAPE)).eval()
    torch.nn.init.zeros_(model.model.embed_tokens.weight)  # tied head: every logit 0, every token 1/6400
    chats = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversations": [{"role": "user", "content": f"What is {a} + {a}?"},
                           {"role": "assistant", "content": f"{a} + {a} = {2 * a}, 天空是蓝色的。"}]} for a in range(6)])
    rows = rows_of(str(chats), tok, 64, str(tmp_path / "cache"))
    assert isinstance(rows, SFTDataset)
    result = score(model, rows, token_bytes(tok), batch_size=4)
    supervised = [int((rows[i]["labels"][1:] != -100).sum()) for i in range(len(rows))]
    assert result["tokens"] == sum(supervised) and result["loss"] == pytest.approx(math.log(6400))
    assert result["perplexity"] == pytest.approx(6400, rel=1e-6)
    answers = [f"{a} + {a} = {2 * a}, 天空是蓝色的。" for a in range(6)]
    assert result["bytes"] == sum(len(answer.encode()) for answer in answers)  # <|im_end|> spells no text
    # every supervised token but <|im_end|> spells text: their loss over those bytes
    assert result["bits_per_byte"] == pytest.approx((sum(supervised) - 6) * math.log2(6400) / result["bytes"])


@pytest.mark.parametrize("layout", [[], ["--pad"], ["--doc_mask"]])
def test_held_out_rows_reproduce_the_training_runs_eval_loss(tok, tmp_path, capsys, layout):
    rng = random.Random(0)
    words = "the cat sat on a mat while the dog ran to the red house by the sea".split()
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(rng.choices(words, k=60))} for _ in range(40)])
    flags = ["--data_path", str(text), "--max_seq_len", "64", "--seed", "7"]
    args = build_parser("t").parse_args([*flags, "--hidden_size", "64", "--num_hidden_layers", "2", "--batch_size", "4",
                                         "--max_steps", "3", "--eval_size", "8", "--dtype", "float32", "--device",
                                         "cpu", "--out_dir", str(tmp_path / "out"), "--save_weight", "pretrain",
                                         "--log_interval", "1", "--cache_dir", str(tmp_path / "cache")])
    args.pad, args.doc_mask = "--pad" in layout, "--doc_mask" in layout  # the pretrain script's own flags
    logged = train(Stage("pretrain", pretrain_data), args).history[-1]["eval/loss"]

    main(["--weight", "pretrain", "--hidden_size", "64", "--out_dir", str(tmp_path / "out"), "--device", "cpu",
          "--held_out", "8", "--cache_dir", str(tmp_path / "cache"), "--json", *flags, *layout])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 8 and result["loss"] == pytest.approx(logged, rel=1e-3)  # fp16 weights on disk


def test_dpo_pairs_and_missing_files_are_one_line_errors(tok, tmp_path, capsys):
    save_weights(MiniMindForCausalLM(MiniMindConfig(**SHAPE)), tmp_path / "full_sft_64.pth")
    pairs = write_jsonl(tmp_path / "dpo.jsonl", [{"chosen": [], "rejected": []}])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    for data, message in ((pairs, "DPO pairs are scored by train_dpo.py"), (tmp_path / "none.jsonl", "not found"),
                          (blank, "blank.jsonl has no rows")):
        with pytest.raises(SystemExit) as exit:
            main(["--hidden_size", "64", "--out_dir", str(tmp_path), "--device", "cpu", "--data_path", str(data)])
        assert message in str(exit.value.code)
    with pytest.raises(SystemExit) as exit:  # more held-out rows than the data has: a usage error
        main(["--hidden_size", "64", "--out_dir", str(tmp_path), "--device", "cpu", "--held_out", "100000",
              "--cache_dir", str(tmp_path / "cache")])
    assert exit.value.code == 2 and "--held_out 100000: the data has" in capsys.readouterr().err


def test_sentencepiece_tokens_count_their_spaces_and_raw_bytes():
    """A Llama-style vocabulary: "▁" is a space, "<0xC3>" one byte (byte fallback)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁the": 1, "▁cat": 2, "<0xC3>": 3, "<0xA9>": 4, "s": 5}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    lengths = token_bytes(tok)
    assert lengths[[1, 2, 5]].sum() == len(" the cats".encode()) and lengths[[3, 4]].sum() == len("é".encode())
    assert lengths[0] == 0  # an added (special) token spells no text
