"""The stage scripts as a user runs them (subprocesses, tiny model, CPU), and DDP under torchrun (2 gloo ranks)."""

import argparse
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import dataset.files as data_files
from model import MiniMindConfig, MiniMindForCausalLM
from model.cli import HelpFormatter
from model.files import REPO_ROOT
from model.loading import load_tokenizer
from model.weights import load_weights, save_weights, vocab_fingerprint
from trainer import Result, build_parser, parse_args
from trainer.cli import what_next
from trainer.train_full_sft import sft_file

TINY = ["--hidden_size", "64", "--num_hidden_layers", "2", "--max_seq_len", "64", "--batch_size", "4",
        "--accumulation_steps", "1", "--max_steps", "4", "--log_interval", "2", "--eval_size", "8",
        "--device", "cpu"]
ENV = {**os.environ, "SWANLAB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def run_script(script: str, *flags: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "trainer" / script), *flags], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_pretrain_then_sft_from_the_command_line(tmp_path):
    rng = random.Random(0)
    words = "the cat sat on a mat while the dog ran to the red house by the sea".split()
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": " ".join(rng.choices(words, k=60))} for _ in range(60)])
    chats = write_jsonl(tmp_path / "chat.jsonl", [
        {"conversations": [{"role": "user", "content": f"{a} plus {b}?"},
                           {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
        for a, b in ((rng.randint(1, 50), rng.randint(1, 50)) for _ in range(40))])
    out = tmp_path / "out"
    pre = run_script("train_pretrain.py", *TINY, "--data_path", str(text), "--out_dir", str(out), "--doc_mask",
                     cwd=REPO_ROOT / "trainer")  # from trainer/ ...
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert "Params: " in pre.stdout and "done: 4 steps" in pre.stdout
    sft = run_script("train_full_sft.py", *TINY, "--data_path", str(chats), "--out_dir", str(out),
                     "--save_hf")  # ... and from the root
    assert sft.returncode == 0, sft.stderr[-3000:]
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=64, num_hidden_layers=2))
    for stage in ("pretrain", "full_sft"):
        load_weights(model, out / f"{stage}_64.pth")
        assert (out / f"{stage}_64_resume.pth").is_file()
        # the vocabulary the embeddings were trained under, so another tokenizer can be refused
        assert json.loads((out / f"{stage}_64.json").read_text())["tokenizer_vocab"] == vocab_fingerprint(load_tokenizer())
    # --save_hf: a stock transformers Llama folder holding the same weights
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "full_sft_64-hf")
    assert type(hf) is LlamaForCausalLM
    ids = torch.randint(3, 6400, (1, 12))
    torch.testing.assert_close(hf(ids).logits, model.eval()(ids).logits, atol=1e-3, rtol=1e-3)  # fp16 file vs fp32
    sft_none = run_script("train_full_sft.py", *TINY, "--data_path", str(chats), "--out_dir", str(tmp_path / "no"))
    assert sft_none.returncode != 0 and "train_pretrain.py" in sft_none.stderr  # names the command that makes it


def test_demo_defaults_never_override_a_typed_flag(capsys):
    parser = build_parser("t", batch_size=32, max_steps=0)
    demo = dict(batch_size=8, max_steps=300)
    args = parse_args(parser, ["--device", "cpu", "--batch_size", "2"], demo=demo)
    assert (args.batch_size, args.max_steps) == (2, 300)
    assert "[cpu] no GPU" in (out := capsys.readouterr().out) and "--max_steps 300" in out
    args = parse_args(parser, ["--device", "cuda"], demo=demo)  # a GPU run keeps MiniMind's defaults
    assert (args.batch_size, args.max_steps) == (32, 0)


def test_demo_defaults_on_a_gpu_when_the_data_is_the_bundled_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_files, "DATA_DIR", tmp_path)
    (tmp_path / "demo").mkdir()
    demo_file = write_jsonl(tmp_path / "demo" / "sft.jsonl", [])
    parser = build_parser("t", batch_size=32, max_steps=0)
    demo = dict(batch_size=8, max_steps=300)

    def parse(*flags: str) -> Namespace:  # --device cuda: parse_args never touches CUDA, so no GPU is needed
        return parse_args(parser, ["--device", "cuda", *flags], sft_file, demo=demo)

    args = parse("--max_steps", "5")
    assert (args.batch_size, args.max_steps, args.data_path) == (8, 5, str(demo_file))
    out = capsys.readouterr().out
    assert out.count("[data]") == 1 and "[demo] training on the bundled demo data" in out and "--batch_size 8" in out
    args = parse("--data_path", str(demo_file))  # a typed path is the user's choice, even the demo file
    assert (args.batch_size, args.max_steps) == (32, 0)
    real = write_jsonl(tmp_path / "sft_mini_512.jsonl", [])  # MiniMind's file: MiniMind's defaults
    args = parse()
    assert (args.batch_size, args.max_steps, args.data_path) == (32, 0, str(real))
    assert capsys.readouterr().out == ""


def test_flag_mistakes_are_usage_errors_not_tracebacks(tmp_path, monkeypatch, capsys):
    parser = build_parser("t")
    for flags, says in [(["--data_path", str(tmp_path / "missing.jsonl")], "data file not found"),
                        (["--compile_mode", "reduce-overhead"], "needs --use_compile 1")]:
        with pytest.raises(SystemExit) as stop:
            parse_args(parser, ["--device", "cpu", *flags], sft_file)
        assert stop.value.code == 2 and says in capsys.readouterr().err
    for flag in (["--save_interval", "-1"], ["--batch_size", "0"]):
        with pytest.raises(SystemExit):
            parse_args(parser, ["--device", "cpu", *flag])
        assert f"{flag[0]} must" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun CUDA graphs are refused before any work starts
    with pytest.raises(SystemExit):
        parse_args(parser, ["--device", "cpu", "--use_compile", "1", "--compile_mode", "reduce-overhead"])
    assert "does not work with DDP" in capsys.readouterr().err


def tiny_run(out: Path, *launcher: str, batch: int) -> tuple[list[dict], dict]:
    history = out / "history.json"
    cmd = [*launcher, str(REPO_ROOT / "tests" / "ddp_train.py"), str(history), "--out_dir", str(out),
           "--batch_size", str(batch), "--max_steps", "4", "--save_interval", "4"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(history.read_text()), torch.load(out / "pretrain_64_resume.pth", weights_only=True)


def test_ddp_two_ranks_with_half_the_batch_equal_one_process(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    two, two_state = tiny_run(tmp_path / "ddp", str(torchrun), "--standalone", "--nproc_per_node", "2",
                              batch=2)
    one, one_state = tiny_run(tmp_path / "one", sys.executable, batch=4)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)  # fp32: all-reduce order
    assert (one_state["world_size"], two_state["world_size"]) == (1, 2)
    for k, w in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][k], w, rtol=1e-4, atol=1e-5)


def test_lora_name_without_its_data_file_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from trainer.train_lora import parse

    monkeypatch.setattr(data_files, "DATA_DIR", tmp_path)  # whatever dataset/ holds on this machine
    (tmp_path / "demo").mkdir()
    demo = write_jsonl(tmp_path / "demo" / "lora_identity.jsonl", [])
    with pytest.raises(SystemExit) as stop:  # not an adapter named medical trained on the identity demo
        parse(["--device", "cpu", "--lora_name", "medical"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and str(tmp_path / "lora_medical.jsonl") in err
    assert "download_data.py lora_medical.jsonl" in err and "--data_path" in err
    assert parse(["--device", "cpu"]).data_path == str(demo)  # the default name still falls back to the demo
    data = write_jsonl(tmp_path / "mine.jsonl", [])
    assert parse(["--device", "cpu", "--lora_name", "medical", "--data_path", str(data)]).data_path == str(data)
    medical = write_jsonl(tmp_path / "lora_medical.jsonl", [])
    assert parse(["--device", "cpu", "--lora_name", "medical"]).data_path == str(medical)


def test_a_missing_or_misfit_start_checkpoint_is_one_line_not_a_traceback(tmp_path):
    result = run_script("train_full_sft.py", *TINY, "--out_dir", str(tmp_path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: --from_weight pretrain: no checkpoint at {tmp_path / 'pretrain_64.pth'}" in result.stderr
    assert f"python trainer/train_pretrain.py --hidden_size 64 --num_hidden_layers 2 --use_moe 0 --out_dir {tmp_path}" \
        in result.stderr  # the command writes where this run looks
    other = tmp_path / "wider.pth"
    save_weights(MiniMindForCausalLM(MiniMindConfig(hidden_size=96, num_hidden_layers=2)), other)
    result = run_script("train_full_sft.py", *TINY, "--out_dir", str(tmp_path), "--from_weight", str(other))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: checkpoint {other} does not fit this model" in result.stderr


def start_script(script: str, *flags: str) -> subprocess.Popen:
    """Started with Ctrl-C's usual meaning, even where pytest runs as a shell's background job (SIGINT ignored)."""
    return subprocess.Popen([sys.executable, str(REPO_ROOT / script), *flags], cwd=REPO_ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until ``path`` exists (the run is in its loop: it saved a step), or fail with what the process said."""
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"no {path}: {proc.communicate()}")
        time.sleep(0.05)


def test_ctrl_c_finishes_the_step_saves_and_prints_the_command_that_continues(tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"row {i}: the cat sat on the mat " * 10} for i in range(40)])
    out = tmp_path / "out"
    flags = [*TINY, "--data_path", str(text), "--out_dir", str(out), "--epochs", "1000", "--max_steps", "0",
             "--save_interval", "1"]
    proc = start_script("trainer/train_pretrain.py", *flags)
    wait_for(out / "pretrain_64_resume.pth", proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    saved = torch.load(out / "pretrain_64_resume.pth", weights_only=True)["step"]
    assert re.search(rf"\[interrupt\] Ctrl-C at step {saved}/\d+; saved step {saved}\n", stdout), stdout
    assert "Traceback" not in stderr
    command = stdout.split("continue this run: ")[1].splitlines()[0]
    assert command == shlex.join(["python", str(REPO_ROOT / "trainer/train_pretrain.py"), *flags, "--from_resume", "1"])

    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:], "--max_steps", str(saved + 2)],
                             cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved}/{saved + 2}" in resumed.stdout and f"done: {saved + 2} steps" in resumed.stdout
    assert f"next: python trainer/train_full_sft.py --hidden_size 64 --num_hidden_layers 2 --out_dir {out}" \
        in resumed.stdout


def test_ctrl_c_on_one_ddp_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGINT to rank 1 alone: rank 0 hears of it through the per-step all-reduce, so both stop after the same
    step and rank 0 saves it (a rank stopping alone would leave the other waiting at its next all-reduce)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    history = tmp_path / "history.json"
    flags = ["--out_dir", str(tmp_path), "--epochs", "1000", "--max_steps", "100000", "--save_interval", "1",
             "--batch_size", "2"]
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2",
                             str(REPO_ROOT / "tests" / "ddp_train.py"), str(history), *flags],
                            cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "pretrain_64_resume.pth", proc)
    workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()  # torchrun's (Linux)
    rank_1 = next(pid for pid in workers if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes())
    os.kill(int(rank_1), signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    saved = torch.load(tmp_path / "pretrain_64_resume.pth", weights_only=True)["step"]
    assert json.loads(history.read_text())[-1]["step"] == saved
    assert f"[interrupt] Ctrl-C at step {saved}/" in stdout


def test_a_bad_value_is_one_line_and_a_mistyped_flag_names_the_close_one(tmp_path, capsys):
    parser = build_parser("t")
    a_file = tmp_path / "out.txt"
    a_file.write_text("not a folder")
    for flags, message in [(["--batch_size", "0"], "--batch_size must be at least 1"),
                           (["--out_dir", str(a_file)], f"cannot save checkpoints in {a_file}: it is a file"),
                           (["--out_dir", str(a_file / "run1")], f"in {a_file / 'run1'}: {a_file} is a file"),
                           (["--data_path", str(tmp_path / "missing.jsonl")], "data file not found")]:
        with pytest.raises(SystemExit) as stop:
            parse_args(parser, ["--device", "cpu", *flags], sft_file)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as stop:
        parse_args(parser, ["--device", "cpu", "--batchsize", "4"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "usage:" in err and "unrecognized arguments: --batchsize 4 (did you mean " \
        "--batch_size?)" in err


def test_every_demo_stops_after_nine_minutes(tmp_path):
    from trainer.train_dpo import parse as parse_dpo
    from trainer.train_lora import parse as parse_lora

    data = write_jsonl(tmp_path / "data.jsonl", [])
    for parse in (parse_lora, parse_dpo):
        assert parse(["--device", "cpu", "--data_path", str(data)]).time_budget == 540
        assert parse(["--device", "cpu", "--data_path", str(data), "--time_budget", "0"]).time_budget == 0


def stage_args(parse, *flags: str) -> Namespace:
    return parse(["--device", "cpu", "--data_path", str(REPO_ROOT / "dataset" / "demo" / "sft.jsonl"), *flags])


def test_a_finished_stage_names_the_next_and_a_cut_one_how_to_continue(tmp_path, monkeypatch):
    """The printed commands are the ones the next scripts parse: checked by parsing them."""
    import eval_llm
    from trainer.train_dpo import parse as parse_dpo
    from trainer.train_lora import parse as parse_lora

    shape = ["--hidden_size", "64", "--use_moe", "1", "--out_dir", str(tmp_path / "my runs")]
    sft = stage_args(parse_lora, *shape)  # a LoRA run's flags are a superset of full SFT's
    sft.save_weight = "my_sft"
    commands = what_next("full_sft", sft, Result(10, 0, 0.0, []), ["trainer/train_full_sft.py"]).splitlines()
    assert [c.split()[:3] for c in commands] == [["next:", "python", "trainer/train_dpo.py"],
                                                 ["next:", "python", "trainer/train_lora.py"],
                                                 ["next:", "python", "trainer/train_grpo.py"],
                                                 ["next:", "python", "eval_llm.py"]]
    dpo = parse_dpo(shlex.split(commands[0])[3:])
    assert (dpo.from_weight, dpo.hidden_size, dpo.use_moe, dpo.out_dir) == ("my_sft", 64, 1, str(tmp_path / "my runs"))
    chat = eval_llm.parse_args(shlex.split(commands[3])[3:])
    assert (chat.weight, chat.hidden_size, chat.out_dir) == ("my_sft", 64, str(tmp_path / "my runs"))

    assert "--from_weight my_sft" in commands[2]  # GRPO starts from full_sft by default, not from my_sft
    after_dpo = what_next("dpo", stage_args(parse_dpo), Result(10, 0, 0.0, []), ["trainer/train_dpo.py"]).splitlines()
    assert after_dpo[0] == "next: python trainer/train_grpo.py --from_weight dpo"
    after_agent = what_next("agent", Namespace(save_weight="agent"), Result(10, 0, 0.0, []), ["trainer/train_agent.py"])
    assert after_agent == "next: python eval_llm.py --weight agent"

    lora = stage_args(parse_lora, "--lora_name", "me")
    [chat_line] = what_next("lora", lora, Result(10, 0, 0.0, []), ["trainer/train_lora.py"]).splitlines()
    assert (eval_llm.parse_args(shlex.split(chat_line)[3:]).lora_weight, lora.from_weight) == ("me", "full_sft")
    assert "--weight full_sft --lora_weight me" in chat_line

    argv = ["trainer/train_pretrain.py", "--max_steps", "9", "--from_resume", "0", "--out_dir", "a b"]
    cut = what_next("pretrain", Namespace(save_weight="pretrain", out_dir="a b"), Result(3, 0, 0.0, [], "time_budget"),
                    argv)
    assert cut.splitlines() == ["continue this run: python trainer/train_pretrain.py --max_steps 9 --out_dir 'a b' "
                                "--from_resume 1",
                                "next: python trainer/train_full_sft.py --out_dir 'a b'"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    interrupted = what_next("pretrain", Namespace(save_weight="pretrain"), Result(3, 0, 0.0, [], "interrupt"), argv)
    assert interrupted == ("continue this run: torchrun --nproc_per_node 2 trainer/train_pretrain.py --max_steps 9 "
                           "--out_dir 'a b' --from_resume 1")


def test_help_keeps_the_docstring_s_commands_and_gives_each_default_once():
    doc = "Stage 9.\n\n    python trainer/train_x.py --a 1      # one command\n    python trainer/train_x.py --b 2\n"
    text = build_parser(doc, epochs=3).format_help()
    assert doc.strip() in text  # the example commands stay one per line, not reflowed into a paragraph
    flat = " ".join(text.split())
    assert "--epochs EPOCHS passes over the training rows (default: 3)" in flat
    assert "--warmup_iters WARMUP_ITERS linear warmup steps before the cosine (default: 0)" in flat  # 0 is a default
    assert "(default: None)" not in flat and "(default: False)" not in flat  # nothing to show
    assert "(default: the best there is)" in flat and "the best there is) (default" not in flat  # said once


def test_help_shows_the_default_of_a_flag_without_help_text():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--port", type=int, default=8998)
    parser.add_argument("--mode", default="")
    flat = " ".join(parser.format_help().split())
    assert flat.endswith("--port PORT default: 8998 --mode MODE")  # an empty default shows nothing
