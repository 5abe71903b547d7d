"""scripts/convert_model.py: ours -> transformers -> ours is exact, and the folder works in plain transformers."""

import errno
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from model.generation import chat_prompt, generation_config
from model.files import REPO_ROOT
from model.hf_interop import save_transformers
from model.loading import load_model, load_tokenizer
from model.weights import CheckpointMismatch, save_weights, vocab_fingerprint
from tests.test_eval_llm import another_vocabulary, needs_tokenizer, tiny_checkpoint

pytestmark = needs_tokenizer
YARN = {"type": "yarn", "factor": 8, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
VARIANTS = {"llama": {}, "llama-yarn": dict(rope_scaling=YARN), "qwen3": dict(qk_norm=True), "moe": dict(use_moe=True)}
ARCHITECTURE = {"llama": "LlamaForCausalLM", "llama-yarn": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
                "moe": "MiniMindForCausalLM"}

# Runs where our package is never imported: only transformers' own classes (or trust_remote_code) can load.
PLAIN_TRANSFORMERS = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
results = {}
for name, folder in json.loads(sys.argv[1]).items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=name == "moe").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "天空为什么是蓝色的"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=ids.ne(-1), max_new_tokens=12, do_sample=False)
    results[name] = dict(cls=type(model).__name__, new=out[0, ids.shape[1]:].tolist(), prompt=ids[0].tolist(),
                         tied=model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr())
assert not any(m == "model" or m.startswith("model.") for m in sys.modules), "our package got imported"
print(json.dumps(results))
"""


def logits(model, seq_len: int = 150) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model(torch.randint(0, 6400, (1, seq_len))).logits


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_roundtrip_ours_transformers_ours_is_exact(tmp_path, variant):
    original = tiny_checkpoint(tmp_path, **VARIANTS[variant])
    save_transformers(original, load_tokenizer(), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [ARCHITECTURE[variant]]
    back, _ = load_model(tmp_path / "hf", device="cpu")
    save_weights(back, tmp_path / "back.pth", dtype=torch.float32)
    # A .pth holds tensors only: YaRN, an inference setting, is asked for again (eval_llm --inference_rope_scaling).
    again, _ = load_model(tmp_path / "back.pth", device="cpu", rope_scaling=VARIANTS[variant].get("rope_scaling"))
    expected = logits(original)  # 150 positions: past YaRN's original 64, so the scaling is exercised
    torch.testing.assert_close(logits(back), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(again), expected, rtol=0, atol=0)


def test_a_folders_own_tokenizer_records_its_vocabulary(tmp_path, capsys):
    """A Llama config.json has no field for it: the tokenizer saved beside the weights says which vocabulary."""
    tokenizer = load_tokenizer()
    save_transformers(tiny_checkpoint(tmp_path, tokenizer_vocab=vocab_fingerprint(tokenizer)), tokenizer,
                      tmp_path / "hf")
    back, _ = load_model(tmp_path / "hf", device="cpu")
    assert back.config.tokenizer_vocab == vocab_fingerprint(tokenizer) and "note" not in capsys.readouterr().err
    save_weights(back, tmp_path / "back.pth")
    assert json.loads((tmp_path / "back.json").read_text())["tokenizer_vocab"] == vocab_fingerprint(tokenizer)
    with pytest.raises(CheckpointMismatch, match="trained with another tokenizer"):
        load_model(tmp_path / "hf", device="cpu", tokenizer=another_vocabulary(tmp_path / "other"))


def test_cli_converts_both_ways(tmp_path, monkeypatch):
    original = tiny_checkpoint(tmp_path)
    main = runpy.run_path(str(REPO_ROOT / "scripts" / "convert_model.py"))["main"]
    for argv in (["--weight", "full_sft", "--hidden_size", "64", "--out_dir", str(tmp_path)],
                 ["--load_from", str(tmp_path / "full_sft_64-hf"), "--out_dir", str(tmp_path)]):
        monkeypatch.setattr(sys, "argv", ["convert_model.py", *argv])
        main()
    back, _ = load_model("converted", hidden_size=64, directory=tmp_path, device="cpu")
    # The .pth is fp16 (MiniMind's format), so compare with the original rounded the same way.
    torch.testing.assert_close(back.state_dict(), {k: v.half().float() for k, v in original.state_dict().items()})
    with pytest.raises(SystemExit, match="exists"):
        main()  # never overwrites without --overwrite



def test_a_full_disk_at_the_final_save_is_one_line(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path)
    main = runpy.run_path(str(REPO_ROOT / "scripts" / "convert_model.py"))["main"]

    def disk_full(obj, f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)  # what atomic_save writes the .pth with
    monkeypatch.setattr(sys, "argv", ["convert_model.py", "--load_from", str(tmp_path / "full_sft_64.pth"),
                                      "--out_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        main()
    message = str(stop.value.code)
    assert message.startswith("error: No space left on the device to save ") and "\n" not in message
    assert str(tmp_path / "converted_64.pth") in message and not (tmp_path / "converted_64.pth").exists()

def test_exported_folder_runs_in_plain_transformers_like_ours(tmp_path):
    tokenizer = load_tokenizer()
    folders, ours = {}, {}
    for name in ("llama", "qwen3", "moe"):
        model = tiny_checkpoint(tmp_path / name, **VARIANTS[name])
        folders[name] = str(save_transformers(model, tokenizer, tmp_path / name / "hf"))
        ids = tokenizer(chat_prompt(tokenizer, [{"role": "user", "content": "天空为什么是蓝色的"}]),
                        return_tensors="pt").input_ids
        out = model.generate(ids, generation_config=generation_config(tokenizer, 12, temperature=0))
        ours[name] = out[0, ids.shape[1]:].tolist()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, json.dumps(folders)], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    for name in folders:
        assert theirs[name]["cls"] == ARCHITECTURE[name]
        assert theirs[name]["tied"]
        assert theirs[name]["new"] == ours[name]  # greedy, stopping at <|im_end|>/<|endoftext|> like ours

    folder = tmp_path / "llama" / "hf"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"], generation["bos_token_id"]) == ([2, 0], 0, 1)
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6} and config["tie_word_embeddings"]
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x (llama.cpp) loads it
    assert not isinstance(tokenizer_config.get("extra_special_tokens"), list)
    assert (folder / "chat_template.jinja").is_file()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once


def test_gguf_reads_back_as_the_same_model_and_tokenizer(tmp_path, monkeypatch):
    """What llama.cpp gets, read by an independent reader: transformers' GGUF loader undoes llama.cpp's q/k row
    order and rebuilds the tokenizer from the vocabulary and merges. (The greedy continuations of stock llama.cpp's
    llama-simple were also checked by hand to equal ours: README.)"""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.export_gguf import save_gguf

    tokenizer = load_tokenizer()
    # transformers' qwen3 GGUF mapping ignores attention.key_length (llama.cpp reads it) and assumes head_dim 128
    for name, overrides, dtype in [("llama", {}, "f32"), ("untied", dict(tie_word_embeddings=False), "f32"),
                                   ("qwen3", dict(qk_norm=True, head_dim=128), "f16")]:
        model = tiny_checkpoint(tmp_path / name, **overrides)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "norm" in param_name:  # non-trivial norms, so a misplaced norm tensor cannot hide
                    param.uniform_(0.5, 1.5)
                elif dtype == "f16":  # the file stores matrices in f16 (norms in f32): compare like with like
                    param.copy_(param.half().float())
        path = save_gguf(model, tokenizer, tmp_path / name / "model.gguf", dtype)
        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
        assert type(theirs).__name__ == ARCHITECTURE.get(name, "LlamaForCausalLM")
        torch.testing.assert_close(logits(theirs, 40), logits(model, 40), rtol=0, atol=1e-5)

    reader = GGUFReader(str(tmp_path / "llama" / "model.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.t")}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.add_bos_token"]) == (2, False)
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
    theirs = AutoTokenizer.from_pretrained(tmp_path / "llama", gguf_file="model.gguf")
    for text in ["Hello world, it's 3.14!", "床前明月光，疑是地上霜。", "<|im_start|>user\n<think>x</think><|im_end|>",
                 "<tool_call>{\"name\": \"f\"}</tool_call>\t \n\n  emoji 🦙"]:
        assert theirs(text).input_ids == tokenizer(text).input_ids, text

    main = runpy.run_path(str(REPO_ROOT / "scripts" / "convert_model.py"))["main"]
    monkeypatch.setattr(sys, "argv", ["convert_model.py", "--weight", "full_sft", "--hidden_size", "64",
                                      "--out_dir", str(tmp_path / "llama"), "--gguf"])
    main()
    assert (tmp_path / "llama" / "full_sft_64.gguf").stat().st_size > 0
    tiny_checkpoint(tmp_path / "moe", use_moe=True)
    monkeypatch.setattr(sys, "argv", ["convert_model.py", "--weight", "full_sft", "--hidden_size", "64", "--use_moe",
                                      "1", "--out_dir", str(tmp_path / "moe"), "--gguf"])
    with pytest.raises(SystemExit, match="dense models"):
        main()


def test_unmerged_lora_layers_are_refused_with_what_to_do(tmp_path):
    from model.model_lora import apply_lora

    model = tiny_checkpoint(tmp_path)
    apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="unmerged LoRA layers: merge them first"):
        save_transformers(model, load_tokenizer(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
