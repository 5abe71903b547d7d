"""Every command a message suggests runs as printed: each test triggers the message, takes the command it prints,
runs it from the repo root (adding only flags that make the run short, never a shape flag), and checks that what
was missing now loads."""

import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from model.files import REPO_ROOT
from model.loading import MAKE_IT_WITH, load_model, random_checkpoint
from tests.test_eval_llm import needs_tokenizer

pytestmark = needs_tokenizer
SHAPE = ["--hidden_size", "64", "--num_hidden_layers", "2"]
SHORT_RUN = ["--max_steps", "2", "--batch_size", "2", "--max_seq_len", "64", "--eval_size", "0", "--device", "cpu"]
ENV = {**os.environ, "SWANLAB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def printed_commands(message: str, lead: str = MAKE_IT_WITH) -> list[list[str]]:
    """The command on the rest of the line after ``lead``, as the argv of each of its ``&&``-joined parts."""
    found = re.search(re.escape(lead) + "(.+)", message)
    assert found, f"no {lead!r} in:\n{message}"
    commands = [[]]
    for token in shlex.split(found[1]):
        if token == "&&":
            commands.append([])
        else:
            commands[-1].append(token)
    return commands


def run_python(argv: list[str], *extra: str) -> subprocess.CompletedProcess:
    """``python SCRIPT FLAGS`` as a user types it in the repo root, with ``extra`` flags at the end."""
    assert argv[0] == "python" and (REPO_ROOT / argv[1]).is_file(), argv
    return subprocess.run([sys.executable, *argv[1:], *extra], cwd=REPO_ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def run_trainers(commands: list[list[str]]) -> None:
    for argv in commands:
        assert argv[1].startswith("trainer/train_"), argv
        result = run_python(argv, *SHORT_RUN)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stderr[-3000:]}"


def test_the_missing_stage_hint_makes_the_checkpoint(tmp_path):
    eval_llm = runpy.run_path(str(REPO_ROOT / "eval_llm.py"))["main"]
    with pytest.raises(SystemExit) as missing:
        eval_llm(["--weight", "full_sft", *SHAPE, "--out_dir", str(tmp_path)])
    commands = printed_commands(str(missing.value.code))
    assert [argv[1] for argv in commands] == ["trainer/train_pretrain.py", "trainer/train_full_sft.py"]  # SFT
    run_trainers(commands)  # starts from the pretrained weights: both are needed, in this order
    model, _ = load_model("full_sft", hidden_size=64, directory=tmp_path, device="cpu")
    assert model.config.num_hidden_layers == 2


def test_the_from_weight_hint_of_a_trainer_makes_the_start_checkpoint(tmp_path):
    sft = ["python", "trainer/train_full_sft.py", *SHAPE, "--out_dir", str(tmp_path)]
    failed = run_python(sft, *SHORT_RUN)
    assert failed.returncode == 1, failed.stderr[-3000:]
    run_trainers(printed_commands(failed.stderr))
    again = run_python(sft, *SHORT_RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "full_sft_64.pth").is_file()


def test_the_missing_lora_hint_makes_the_adapter(tmp_path):
    random_checkpoint(tmp_path)  # the full_sft_64.pth the adapter is asked for on top of
    with pytest.raises(FileNotFoundError) as missing:
        load_model("full_sft", hidden_size=64, directory=tmp_path, lora="identity", device="cpu")
    run_trainers(printed_commands(str(missing.value)))
    merged, _ = load_model("full_sft", hidden_size=64, directory=tmp_path, lora="identity", device="cpu")
    base, _ = load_model("full_sft", hidden_size=64, directory=tmp_path, device="cpu")
    assert any((a != b).any() for a, b in zip(merged.parameters(), base.parameters()))  # two steps moved it


def test_the_chat_commands_convert_prints_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "my models"  # a space: the printed path must be quoted
    random_checkpoint(out)
    convert = runpy.run_path(str(REPO_ROOT / "scripts" / "convert_model.py"))["main"]
    eval_llm = runpy.run_path(str(REPO_ROOT / "eval_llm.py"))["main"]
    for flags in (["--weight", "full_sft", "--hidden_size", "64"],  # -> a transformers folder
                  ["--load_from", str(out / "full_sft_64-hf")]):  # -> back to a .pth
        monkeypatch.setattr(sys, "argv", ["convert_model.py", *flags, "--out_dir", str(out)])
        convert()
        (chat,) = printed_commands(capsys.readouterr().out, "chat: ")
        assert chat[:2] == ["python", "eval_llm.py"]
        monkeypatch.setattr(sys, "stdin", io.StringIO("你好\n"))
        eval_llm([*chat[2:], "--max_new_tokens", "2", "--device", "cpu"])  # in-process: a subprocess costs seconds
        printed = capsys.readouterr()
        assert "👶: 你好" in printed.out and "Params:" in printed.err
    assert Path(chat[-1]) == out / "converted_64.pth"
