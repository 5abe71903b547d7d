"""eval_llm.py and the loader behind it: piped prompts through the real CLI, streaming == generate, clear errors."""

import json
import os
import runpy
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

from model import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.generation import ReplyStream, chat_prompt, generation_config
from model.checkpoint_config import config_for_state_dict
from model.files import REPO_ROOT, TOKENIZER_DIR
from model.loading import load_model, load_tokenizer
from model.weights import CheckpointMismatch, load_weights, save_weights, vocab_fingerprint

# 8 heads: without q/k-norm a file cannot tell its head count, and the loader assumes MiniMind's 8.
# initializer_range 0.2: random weights that say varied things (at 0.02 they repeat one token).
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, intermediate_size=128,
             max_position_embeddings=512, initializer_range=0.2)
PROMPTS = ["你好", "天空为什么是蓝色的"]

needs_tokenizer = pytest.mark.skipif(not (TOKENIZER_DIR / "tokenizer.json").is_file(), reason="no tokenizer in model/")


def run(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    """A repo script as users run it, from another directory (paths must not depend on the cwd)."""
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, text=True, timeout=timeout,
                          cwd="/", env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


def tiny_checkpoint(directory, stage: str = "full_sft", **overrides) -> MiniMindForCausalLM:
    """A random tiny model saved as MiniMind names it (<directory>/<stage>_64.pth), in fp32 so reloads are exact."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(**{**SHAPE, **overrides})).eval()
    save_weights(model, directory / f"{stage}_{model.config.suffix}.pth", dtype=torch.float32)
    return model


def greedy_reply(model, tokenizer, text: str, max_new_tokens: int) -> tuple[str, int]:
    ids = tokenizer(chat_prompt(tokenizer, [{"role": "user", "content": text}]), return_tensors="pt").input_ids
    out = model.generate(ids, generation_config=generation_config(tokenizer, max_new_tokens, temperature=0))
    new = out[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


@needs_tokenizer
def test_piped_prompts_get_greedy_replies_within_max_new_tokens(tmp_path):
    model = tiny_checkpoint(tmp_path)
    result = run(str(REPO_ROOT / "eval_llm.py"), "--weight", "full_sft", "--hidden_size", "64", "--out_dir",
                 str(tmp_path), "--temperature", "0", "--max_new_tokens", "12", stdin="\n".join(PROMPTS) + "\n")
    assert result.returncode == 0, result.stderr
    tokenizer = load_tokenizer()
    for text in PROMPTS:
        reply, n = greedy_reply(model, tokenizer, text, 12)
        assert n <= 12
        # The streamed reply, as printed, equals generate()'s decoded text, followed by the speed line.
        assert f"👶: {text}\n🤖: {reply}\n[{n} tokens, " in result.stdout, result.stdout


@needs_tokenizer
@pytest.mark.parametrize("num_beams", [1, 2])
def test_streamed_text_equals_generate(tmp_path, num_beams):
    tiny_checkpoint(tmp_path)
    model, tokenizer = load_model("full_sft", hidden_size=64, directory=tmp_path, device="cpu")
    prompt = chat_prompt(tokenizer, [{"role": "user", "content": PROMPTS[1]}])
    config = generation_config(tokenizer, max_new_tokens=15, temperature=0, num_beams=num_beams)
    stream = ReplyStream(model, tokenizer, prompt, config)
    pieces = list(stream)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(ids, generation_config=config)[0, ids.shape[1]:]
    assert "".join(pieces) == stream.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert stream.completion_tokens == len(expected) <= 15
    assert stream.finish_reason == ("stop" if expected[-1] in (0, 2) else "length")


@needs_tokenizer
def test_leaving_a_stream_early_stops_generation(tmp_path):
    tiny_checkpoint(tmp_path)
    model, tokenizer = load_model("full_sft", hidden_size=64, directory=tmp_path, device="cpu")
    stream = ReplyStream(model, tokenizer, "hello", generation_config(tokenizer, max_new_tokens=2000, temperature=0))
    pieces = iter(stream)
    next(pieces)
    pieces.close()  # what Ctrl-C in the chat and a hung-up HTTP client do
    assert stream.completion_tokens < 2000 and stream.finish_reason == "stop"


def test_missing_checkpoint_names_file_and_training_command(tmp_path):
    tiny_checkpoint(tmp_path, stage="pretrain")
    main = runpy.run_path(str(REPO_ROOT / "eval_llm.py"))["main"]  # in-process: the CLI run above costs seconds
    with pytest.raises(SystemExit) as exit:
        main(["--weight", "dpo", "--out_dir", str(tmp_path)])
    assert str(tmp_path / "dpo_512.pth") in str(exit.value.code)
    assert "python trainer/train_dpo.py --hidden_size 512" in str(exit.value.code)
    with pytest.raises(SystemExit) as exit:
        main(["--weight", "pretrain", "--hidden_size", "768", "--out_dir", str(tmp_path)])
    assert f"Found {tmp_path / 'pretrain_64.pth'}: load it with --hidden_size 64" in str(exit.value.code)
    with pytest.raises(SystemExit) as exit:  # a typo: no training script to suggest, but what is there
        main(["--weight", "pretrian", "--out_dir", str(tmp_path)])
    assert "No training stage is called 'pretrian'" in str(exit.value.code) and "pretrain_64.pth" in str(exit.value.code)


@needs_tokenizer
def test_the_file_decides_the_shape_when_flags_disagree(tmp_path, capsys):
    saved = tiny_checkpoint(tmp_path)
    model, _ = load_model("full_sft", hidden_size=64, num_hidden_layers=8, directory=tmp_path, device="cpu")
    assert model.config.num_hidden_layers == 2
    assert "has --num_hidden_layers 2, not 8" in capsys.readouterr().err
    x = torch.randint(0, 6400, (1, 12))
    torch.testing.assert_close(model(x).logits, saved(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_are_recovered_from_their_tensors(preset):
    config = MiniMindConfig.from_preset(preset)
    with torch.device("meta"):  # shapes only: no memory, no time
        state = MiniMindForCausalLM(config).state_dict()
    found = config_for_state_dict(state)
    assert found.to_dict() == {**config.to_dict(), "transformers_version": found.to_dict()["transformers_version"]}


@needs_tokenizer
def test_lora_weight_is_merged_and_gives_the_adapter_outputs(tmp_path):
    from model.model_lora import apply_lora, lora_path, save_lora

    base = tiny_checkpoint(tmp_path)
    apply_lora(base, rank=4)
    for name, p in base.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would make the adapter a no-op
    save_lora(base, lora_path("identity", base.config, tmp_path))
    model, _ = load_model("full_sft", hidden_size=64, lora="identity", directory=tmp_path, device="cpu")
    assert not any("lora" in k for k in model.state_dict())
    x = torch.randint(0, 6400, (1, 12))
    torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-4, atol=1e-5)


@needs_tokenizer
def test_fit_history_drops_oldest_exchanges_and_keeps_system():
    from model.generation import fit_history

    tokenizer = load_tokenizer()
    system = {"role": "system", "content": "You are MiniMind."}
    chat = [system]
    for i in range(6):
        chat += [{"role": "user", "content": f"question {i} " * 10}, {"role": "assistant", "content": f"answer {i} " * 10}]
    chat.append({"role": "user", "content": "the newest question"})
    full = len(tokenizer(chat_prompt(tokenizer, chat)).input_ids)
    kept = fit_history(tokenizer, chat, full // 2)
    assert kept[0] == system and kept[-1] == chat[-1]
    assert kept[1]["role"] == "user" and kept[1:] == chat[len(chat) - len(kept) + 1:]  # a suffix of whole exchanges
    assert len(tokenizer(chat_prompt(tokenizer, kept)).input_ids) <= full // 2
    assert fit_history(tokenizer, chat, full) == chat
    assert fit_history(tokenizer, chat, 1) == [system, chat[-1]]  # the newest message always stays


def test_an_untied_checkpoint_loads_with_its_own_head(tmp_path):
    saved = tiny_checkpoint(tmp_path, tie_word_embeddings=False)
    (tmp_path / "full_sft_64.json").unlink()  # a MiniMind .pth comes without our config: the tensors must tell
    model, _ = load_model("full_sft", hidden_size=64, directory=tmp_path, device="cpu")
    assert model.config.tie_word_embeddings is False
    x = torch.randint(0, 6400, (1, 12))
    torch.testing.assert_close(model(x).logits, saved(x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="untied embeddings.*tie_word_embeddings=False"):
        load_weights(MiniMindForCausalLM(MiniMindConfig(**SHAPE)), tmp_path / "full_sft_64.pth")


def test_the_config_saved_beside_the_weights_gives_what_tensors_cannot(tmp_path, capsys):
    """A reduced minimind3-moe matches no preset by shape: its top-1 routing and eps 1e-6 come from the .json."""
    torch.manual_seed(0)
    config = MiniMindConfig.from_preset("minimind3-moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                                        initializer_range=0.2)
    saved = MiniMindForCausalLM(config).eval()
    path = save_weights(saved, tmp_path / "full_sft_64_moe.pth", dtype=torch.float32)
    model, _ = load_model(path, device="cpu")
    got = {k: getattr(model.config, k) for k in ("num_experts_per_tok", "n_shared_experts", "rms_norm_eps")}
    assert got == {"num_experts_per_tok": 1, "n_shared_experts": 0, "rms_norm_eps": 1e-6}
    x = torch.randint(0, 6400, (1, 12))
    torch.testing.assert_close(model(x).logits, saved(x).logits, rtol=0, atol=0)

    # A .json left over from a model of another shape is ignored (with a note): the tensors win.
    (tmp_path / "full_sft_64_moe.json").write_text(MiniMindConfig(**SHAPE).to_json_string())
    model, _ = load_model(path, device="cpu")
    assert model.config.num_experts_per_tok == 2 and "describes another shape" in capsys.readouterr().err


def another_vocabulary(folder):
    """A tokenizer folder: ours with two tokens' ids swapped (same size, other vocabulary)."""
    folder.mkdir()
    spec = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    return folder


@needs_tokenizer
def test_weights_refuse_a_tokenizer_of_another_vocabulary(tmp_path, capsys):
    """Every vocabulary here has 6,400 tokens, so only the recorded fingerprint can tell them apart."""
    ours = vocab_fingerprint(load_tokenizer())
    tiny_checkpoint(tmp_path, tokenizer_vocab=ours)
    other = another_vocabulary(tmp_path / "other_tokenizer")
    assert vocab_fingerprint(load_tokenizer(other)) != ours

    load_model("full_sft", hidden_size=64, directory=tmp_path, device="cpu")  # the tokenizer it was trained with
    assert capsys.readouterr().err == ""
    with pytest.raises(CheckpointMismatch, match="trained with another tokenizer.*pass --tokenizer"):
        load_model("full_sft", hidden_size=64, directory=tmp_path, device="cpu", tokenizer=other)
    with pytest.raises(CheckpointMismatch, match="trained with another tokenizer"):  # a trainer's --from_weight
        load_weights(MiniMindForCausalLM(MiniMindConfig(**SHAPE, tokenizer_vocab="0" * 16)),
                     tmp_path / "full_sft_64.pth")

    # A file that records no vocabulary (MiniMind's releases) loads, with a note that it may need MiniMind's.
    (tmp_path / "full_sft_64.json").unlink()
    load_model("full_sft", hidden_size=64, directory=tmp_path, device="cpu")
    assert "--tokenizer path/to/minimind/model" in capsys.readouterr().err


def test_a_checkpoint_of_another_shape_names_the_flags_it_needs(tmp_path):
    config = MiniMindConfig.from_preset("minimind3", hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    path = save_weights(MiniMindForCausalLM(config), tmp_path / "pretrain_64.pth")
    with pytest.raises(ValueError) as err:
        load_weights(MiniMindForCausalLM(MiniMindConfig(**SHAPE)), path)
    assert "The file needs: --preset minimind3 --hidden_size 64 --num_hidden_layers 2 (intermediate_size=128)" \
        in str(err.value)


def test_a_reply_that_thinks_shows_the_thinking_apart_and_keeps_only_the_answer(monkeypatch, capsys):
    eval_llm = runpy.run_path(str(REPO_ROOT / "eval_llm.py"))

    pieces = ["<think>", "\nAdd the", " two.\n</think>", "\n\n", "2"]  # what a model trained on reasoning writes

    class Scripted:
        def __init__(self, *args):
            self.finish_reason = "stop" if pieces[-1] == "2" else "length"

        def __iter__(self):
            yield from pieces

    monkeypatch.setitem(eval_llm["respond"].__globals__, "ReplyStream", Scripted)
    assert eval_llm["respond"](None, None, "1+1=?", None, show_speed=False) == "2"  # the history gets the answer
    assert capsys.readouterr().out == "🤖: (thinking) Add the two.\n2\n"
    pieces[2:] = [" two"]  # cut off by max_new_tokens mid-thought
    assert eval_llm["respond"](None, None, "1+1=?", Namespace(max_new_tokens=4), show_speed=False) == ""
    assert capsys.readouterr().out.endswith("Add the two\n[the reply ended while still thinking: raise "
                                            "--max_new_tokens (now 4)]\n")


def test_bad_sampling_flags_and_a_missing_device_are_one_line_errors(tmp_path, capsys):
    main = runpy.run_path(str(REPO_ROOT / "eval_llm.py"))["main"]
    for flags in (["--top_k", "-1"], ["--top_p", "0"], ["--repetition_penalty", "0"], ["--temperature", "-1"]):
        with pytest.raises(SystemExit) as exit:
            main(flags)
        assert exit.value.code == 2 and "sampling needs" in capsys.readouterr().err
    tiny_checkpoint(tmp_path)
    missing = "mps" if torch.cuda.is_available() else "cuda"
    if torch.cuda.is_available() and torch.backends.mps.is_available():
        pytest.skip("this machine has both CUDA and MPS")
    with pytest.raises(SystemExit) as exit:
        main(["--hidden_size", "64", "--out_dir", str(tmp_path), "--device", missing])
    assert f"error: device '{missing}' is not usable here" in str(exit.value.code)


def test_a_typed_out_dir_is_found_in_the_current_directory_first(tmp_path, monkeypatch):
    from model.files import OUT_DIR, out_dir

    monkeypatch.chdir(tmp_path)
    assert out_dir(None) == OUT_DIR and out_dir("runs") == REPO_ROOT / "runs"  # nothing here: the repo's
    (tmp_path / "runs").mkdir()
    assert out_dir("runs") == tmp_path / "runs"


def test_historys_is_minimind_s_name_for_history_cnt():
    parse_args = runpy.run_path(str(REPO_ROOT / "eval_llm.py"))["parse_args"]
    assert parse_args(["--historys", "4"]).history_cnt == 4 == parse_args(["--history_cnt", "4"]).history_cnt
