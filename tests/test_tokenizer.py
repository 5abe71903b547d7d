"""The shipped tokenizer (model/), its chat template, the demo data's schema, and train_tokenizer.py end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO_ROOT / "model"
DEMO_DIR = REPO_ROOT / "dataset" / "demo"
FIXTURES = REPO_ROOT / "tests" / "fixtures"
RESERVED = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]

# Written for this test, in none of the training sources: the chars/token figures in the README come from these.
ZH = ("周末的早晨，城市还没有完全醒来。我沿着河边的小路慢慢走，看见几位老人在打太极拳，一个小男孩骑着自行车从身边经过，车铃叮当作响。"
      "路边的早餐店已经开门了，蒸笼里冒出白色的热气，豆浆和油条的香味飘得很远。我买了一杯热豆浆，坐在长椅上，打开手机查看这周的工作安排。"
      "最近公司在开发一个新的应用程序，需要和设计团队反复讨论用户界面的细节。虽然工作很忙，但是能和同事们一起解决问题，我觉得很有成就感。"
      "喝完豆浆，太阳已经升得很高，阳光照在水面上，闪闪发光。我决定今天不加班，下午去图书馆借几本关于历史和科学的书，晚上再给父母打个电话，"
      "问问他们的身体情况。")
EN = ("On Saturday morning the market opened earlier than usual. Farmers unloaded crates of apples, carrots and fresh "
      "bread while a street musician tuned his guitar near the fountain. My sister and I had planned to buy vegetables "
      "for the week, but we ended up talking with an old carpenter who repairs chairs in a small workshop behind the "
      "library. He explained that most furniture breaks at the joints, not in the wood itself, and that a little glue "
      "and patience can save a chair that people would otherwise throw away. Before we left, he showed us a table he "
      "had built forty years ago for his daughter's wedding. It still stands in his kitchen, he said, because good "
      "work is quiet and lasts longer than fashion.")
CODE = 'def fib(n: int) -> list[int]:\n    """斐波那契"""\n    a, b = 0, 1\n    out = []\n    for _ in range(n):\n' \
       '        out.append(a)\n        a, b = b, a + b\n\treturn out  # tab + trailing spaces   \n\n'
EMOJI = "Good job 👍🏽! 家庭：👨‍👩‍👧‍👦 旗帜 🇨🇳 ∑x² ≤ 10⁻³ — «ok» café naïve"

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOLS_BLOCK = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
               "function signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False)
               + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
               "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
               "<args-json-object>}\n</tool_call>")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


def test_vocab_and_special_ids(tok):
    assert len(tok) == 6400
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + RESERVED) == list(range(9))
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 0, 1, 2)
    # Each marker is one token, never split, and survives skip_special_tokens (tool/reasoning parsers need it).
    text = "<|im_start|>assistant\n<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call><|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert [1, 7, 8, 3, 4, 2] == [i for i in ids if i < 9]
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call>"


def test_config_loads_in_transformers_4_and_5():
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(config.get("extra_special_tokens"), list)
    assert (MODEL_DIR / "chat_template.jinja").is_file()


@pytest.mark.parametrize("text", [ZH, EN, CODE, EMOJI, " leading and trailing spaces ", "\n\n", "a\u00a0b\u200bc"])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_no_bos_eos_added(tok):
    assert tok("你好")["input_ids"] == tok.encode("你好", add_special_tokens=False)


def test_chars_per_token(tok):
    """A floor under the README's figures (1.26 zh, 3.04 en; 1.28 and 2.44 before the retraining for English): a
    retrained vocabulary must not get much worse."""
    assert len(ZH) / len(tok.encode(ZH)) > 1.2
    assert len(EN) / len(tok.encode(EN)) > 2.3


def paragraphs(path: Path) -> list[str]:
    return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def chars_per_token(tokenizer_file: Path, texts: list[str]) -> float:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    return sum(map(len, texts)) / sum(len(tokenizer.encode(t).ids) for t in texts)


@pytest.mark.parametrize("language,goal", [("en", 0.95), ("zh", 0.97)])
def test_compresses_held_out_prose_about_as_well_as_minimind(language, goal):
    """Characters per token on paragraphs written for this test (tests/fixtures), ours over MiniMind's (minimind-3's
    tokenizer, same vocabulary size). The shipped tokenizer gives 0.99x in English and 1.08x in Chinese; the one
    before it, trained with little English prose, gave 0.82x and 1.10x."""
    texts = paragraphs(FIXTURES / f"prose_{language}.txt")
    assert len(texts) == 10
    ours = chars_per_token(MODEL_DIR / "tokenizer.json", texts)
    minimind = chars_per_token(FIXTURES / "minimind_tokenizer" / "tokenizer.json", texts)
    assert ours >= goal * minimind, f"{language}: {ours:.3f} chars/token, MiniMind {minimind:.3f}"


CHAT = [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"}, {"role": "user", "content": "Say hi in English."}]
CHATML = ("<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
          "<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n<|im_start|>user\nSay hi in English.<|im_end|>\n")


def test_chat_template_plain_chatml(tok):
    assert tok.apply_chat_template(CHAT, tokenize=False) == CHATML
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == CHATML + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == 1 and ids[-3:] == tok.encode("<|im_start|>assistant\n") and len(ids) == len(tok.encode(CHATML)) + 3


def test_chat_template_tool_call_row(tok):
    """A minimind-3 style row with tools, a tool call, a tool result and reasoning, parsed (json.loads) first."""
    row = [{"role": "system", "content": "你是助手", "tools": TOOLS},
           {"role": "user", "content": "北京天气？"},
           {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"}}]},
           {"role": "tool", "content": '{"temp": 20}'},
           {"role": "assistant", "content": "北京 20 度。", "reasoning_content": "工具说 20 度。"}]
    expected = ("<|im_start|>system\n你是助手\n\n" + TOOLS_BLOCK + "<|im_end|>\n<|im_start|>user\n北京天气？<|im_end|>\n"
                "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"北京\"}}\n"
                "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{\"temp\": 20}\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n<think>\n工具说 20 度。\n</think>\n\n北京 20 度。<|im_end|>\n")
    assert tok.apply_chat_template(row, tokenize=False) == expected
    # The same through the standard `tools=` argument and OpenAI-style {"function": {...}} calls, no system turn.
    openai = [dict(m) for m in row[1:]]
    openai[1]["tool_calls"] = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}]
    rendered = tok.apply_chat_template(openai, tools=TOOLS, tokenize=False)
    assert rendered == "<|im_start|>system\n" + TOOLS_BLOCK + "<|im_end|>\n" + expected.split("<|im_end|>\n", 1)[1]


def test_chat_template_raw_json_strings(tok):
    """Rows exactly as stored (tools / tool_calls as JSON strings) render without error, the strings verbatim."""
    row = [{"role": "system", "content": "", "tools": json.dumps(TOOLS)}, {"role": "user", "content": "hi"},
           {"role": "assistant", "content": "", "tool_calls": '[{"name": "f", "arguments": {}}]'},
           {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    out = tok.apply_chat_template(row, tokenize=False)
    assert "<tools>\n" + json.dumps(TOOLS) + "\n</tools>" in out
    assert '<|im_start|>assistant\n<tool_call>\n[{"name": "f", "arguments": {}}]\n</tool_call><|im_end|>\n' in out
    # Consecutive tool results share one user turn, as in Qwen3 / minimind-3.
    assert out.endswith("<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response>"
                        "<|im_end|>\n")


def _turns_ok(turns) -> bool:
    roles = [t["role"] for t in turns]
    if roles and roles[0] == "system":
        roles = roles[1:]
    return (all(isinstance(t["content"], str) and t["content"] for t in turns) and len(roles) >= 2
            and roles == ["user", "assistant"] * (len(roles) // 2))


@pytest.mark.parametrize("name", ["pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "lora_identity.jsonl"])
def test_demo_data_schema(name):
    lines = (DEMO_DIR / name).read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 100
    for n, line in enumerate(lines, 1):
        row = json.loads(line)
        if name == "pretrain.jsonl":
            assert list(row) == ["text"] and isinstance(row["text"], str) and row["text"], n
        elif name == "dpo.jsonl":
            assert list(row) == ["chosen", "rejected"], n
            assert _turns_ok(row["chosen"]) and _turns_ok(row["rejected"]), n
            assert row["chosen"][:-1] == row["rejected"][:-1] and row["chosen"][-1] != row["rejected"][-1], n
        else:
            assert list(row) == ["conversations"] and _turns_ok(row["conversations"]), n


def test_identity_data_says_minimind():
    rows = [json.loads(line) for line in (DEMO_DIR / "lora_identity.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all("MiniMind" in row["conversations"][-1]["content"] for row in rows)


def test_train_tokenizer_end_to_end(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    texts = [ZH, EN, CODE, EMOJI] * 5
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    out = tmp_path / "tok"
    subprocess.run([sys.executable, str(REPO_ROOT / "trainer" / "train_tokenizer.py"), "--corpus", str(corpus),
                    "--out_dir", str(out), "--vocab_size", "300"], check=True, capture_output=True, timeout=120)
    small = AutoTokenizer.from_pretrained(str(out))
    assert len(small) == 300
    assert small.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + RESERVED) == list(range(9))
    assert small.decode(small.encode(ZH + EMOJI)) == ZH + EMOJI
    assert small.apply_chat_template(CHAT, tokenize=False) == CHATML


# MiniMind2's tokenizer_config.json layout (older transformers style: chat template inline, added_tokens_decoder,
# a template that opens the assistant turn right after each user turn). Its tokenizer.json is a 6400-token byte-level
# BPE with the same special ids; ours stands in for it here, since MiniMind's files cannot be downloaded in tests.
MINIMIND2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}{% else %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}")


def minimind2_tokenizer_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((MODEL_DIR / "tokenizer.json").read_bytes())
    special = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False, "added_tokens_decoder": special,
        "additional_special_tokens": [], "bos_token": "<|im_start|>", "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "legacy": True, "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<|endoftext|>", "chat_template": MINIMIND2_TEMPLATE}))
    return folder


def test_minimind2_tokenizer_folder_loads_and_trains_sft(tmp_path):
    """A folder in MiniMind2's layout loads unchanged and drives the SFT loader (assistant tokens supervised)."""
    import torch

    from dataset import SFTDataset
    from model.loading import load_tokenizer

    tok = load_tokenizer(minimind2_tokenizer_folder(tmp_path / "minimind_tokenizer"))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    text = tok.apply_chat_template(chat, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                    "<|im_start|>assistant\n你好！<|im_end|>\n")
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"conversations": chat}, ensure_ascii=False) + "\n", encoding="utf-8")
    item = SFTDataset(data, tok, 64)[0]
    supervised = item["input_ids"][item["labels"] != -100]
    assert tok.decode(supervised) == "你好！<|im_end|>"
    assert torch.equal(item["labels"][item["labels"] != -100], supervised)


def write_corpus(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_train_tokenizer_names_the_bad_corpus_line(tmp_path):
    from dataset import DataError, iter_documents
    from trainer.train_tokenizer import main

    ok = json.dumps({"text": EN})
    for bad, says in [('{"text": "cut', "malformed JSON"), ('{"txt": "x"}', "string 'text'"),
                      ('{"text": 3}', "string 'text'")]:
        corpus = write_corpus(tmp_path / "corpus.jsonl", [ok, "", bad])  # the blank line still counts
        with pytest.raises(DataError, match=f"corpus.jsonl:3: .*{says}"):
            list(iter_documents(corpus))
        with pytest.raises(SystemExit) as stop:  # main prints one line, no traceback
            main(["--corpus", str(corpus), "--out_dir", str(tmp_path / "tok"), "--vocab_size", "300"])
        assert f"{corpus}:3: " in str(stop.value.code)
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize("size", ["0", "-5", "264"])
def test_train_tokenizer_refuses_a_vocabulary_smaller_than_its_fixed_tokens(tmp_path, size, capsys):
    """9 special tokens + 256 byte symbols = 265: fewer used to save a 265-token tokenizer anyway (or overflow)."""
    from trainer.train_tokenizer import main

    corpus = write_corpus(tmp_path / "corpus.jsonl", [json.dumps({"text": EN})])
    with pytest.raises(SystemExit) as stop:
        main(["--corpus", str(corpus), "--out_dir", str(tmp_path / "tok"), "--vocab_size", size])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"--vocab_size {size}: " in err and "usage:" not in err  # one line
    assert not (tmp_path / "tok").exists()


def test_train_tokenizer_on_a_corpus_too_small_for_the_vocabulary(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", [json.dumps({"text": "hello world"})])
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "trainer" / "train_tokenizer.py"), "--corpus", str(corpus),
                           "--out_dir", str(tmp_path / "tok"), "--vocab_size", "300"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "fewer than --vocab_size 300" in proc.stderr and "more text" in proc.stderr
    assert not (tmp_path / "tok").exists()


def test_train_tokenizer_never_silently_replaces_another_vocabulary(tmp_path):
    from trainer.train_tokenizer import main

    out = tmp_path / "tok"
    flags = ["--out_dir", str(out), "--vocab_size", "300"]
    first = write_corpus(tmp_path / "first.jsonl", [json.dumps({"text": EN})] * 3)
    other = write_corpus(tmp_path / "other.jsonl", [json.dumps({"text": ZH}, ensure_ascii=False)] * 3)
    main(["--corpus", str(first), *flags])
    main(["--corpus", str(first), *flags])  # the same vocabulary again: no --force needed
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(SystemExit) as stop:
        main(["--corpus", str(other), *flags])
    assert "another vocabulary" in str(stop.value.code) and "--force" in str(stop.value.code)
    assert "--out_dir" in str(stop.value.code)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the old files untouched
    main(["--corpus", str(other), *flags, "--force"])
    assert (out / "tokenizer.json").read_bytes() != before["tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.jsonl", "other.jsonl", "tok"]  # no temp folder left
