"""Knowledge distillation (trainer/train_distillation.py): the loss against hand-worked numbers, masking, --alpha 1 as
SFT, the vocabulary check, a tiny student that really moves toward a trained tiny teacher, and the script end to end."""

import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from dataset import DataError, PretrainDataset, SFTDataset, pad_collate
from model import MiniMindForCausalLM
from model.files import REPO_ROOT
from model.hf_interop import save_transformers
from model.loading import load_model, load_tokenizer
from model.weights import CheckpointMismatch, save_weights
from trainer import lm_loss, train
from trainer.args import model_config
from trainer.train_distillation import (DistillationLoss, detect_kind, distillation_data, distillation_loss,
                                        distillation_stage, load_teacher, parse)

TEACHER_SHAPE = dict(hidden_size=64, num_hidden_layers=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matmuls this small gain nothing from a second thread, and lose much to it on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def arithmetic(rng: random.Random, n: int) -> list[dict]:
    """Chats with a pattern a tiny model learns in a few dozen steps: "a plus b?" -> "a plus b is c."."""
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        rows.append({"conversations": [{"role": "user", "content": f"{a} plus {b}?"},
                                       {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory, tok) -> Path:
    """Training chats, held-out chats, and out/full_sft_64.pth: a 64-wide teacher trained on the chats for 30 steps.
    A random model's distributions are near uniform (nothing to distil); one trained to convergence is nearly the
    labels themselves; one trained a bit has learnt the pattern in part, with soft distributions of its own."""
    root = tmp_path_factory.mktemp("distill")
    rng = random.Random(0)
    write_jsonl(root / "train.jsonl", arithmetic(rng, 64))
    write_jsonl(root / "held_out.jsonl", arithmetic(rng, 16))
    torch.manual_seed(0)
    teacher = MiniMindForCausalLM(model_config(Namespace(preset=None, use_moe=None, **TEACHER_SHAPE), tok))
    rows = list(SFTDataset(root / "train.jsonl", tok, 64))
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for step in range(30):
        loss, _ = lm_loss(teacher, pad_collate(random.Random(step).sample(rows, 16)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_weights(teacher, root / "out" / "full_sft_64.pth", dtype=torch.float32)
    return root


def flags(work: Path, out: Path, *extra: str) -> list[str]:
    """A 32-wide, 1-layer student from random weights, distilled from the fixture's teacher, fp32 on the CPU."""
    return ["--teacher", str(work / "out" / "full_sft_64.pth"), "--hidden_size", "32", "--num_hidden_layers", "1",
            "--from_weight", "none", "--data_path", str(work / "train.jsonl"), "--out_dir", str(out), "--batch_size",
            "8", "--max_seq_len", "64", "--eval_size", "0", "--dtype", "float32", "--device", "cpu", "--log_interval",
            "10", *extra]


# ----------------------------------------------------------------------------------------------------------------------
# the loss


def test_kl_is_zero_when_the_student_is_the_teacher():
    logits = torch.randn(2, 6, 11) * 3
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100
    loss, m = distillation_loss(logits, logits.clone(), labels, alpha=0.3, temperature=1.5)
    assert m["kl"].item() == 0 and m["top1_agreement"].item() == 1
    assert loss.item() == pytest.approx(0.3 * m["ce"].item(), rel=1e-6)


def test_loss_equals_a_hand_worked_example():
    """Vocabulary of 3, one row of 3 tokens: the logits at positions 0 and 1 score labels 0 and 2 (the last
    position scores nothing). T = 2, alpha = 0.25."""
    T, alpha = 2.0, 0.25
    student = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [9.0, -9.0, 5.0]]
    teacher = [[2.0, 0.0, 0.0], [0.0, 0.0, 4.0], [-7.0, 3.0, 8.0]]
    labels = [-100, 0, 2]

    def softmax(xs):
        e = [math.exp(x) for x in xs]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    # CE with the plain logits: position 0 to label 0, position 1 to label 2
    ce = (-math.log(softmax(student[0])[0]) - math.log(softmax(student[1])[2])) / 2
    # KL at temperature T: softmax(logits / T)
    soft = lambda row: softmax([x / T for x in row])  # noqa: E731
    kl_mean = (kl(soft(teacher[0]), soft(student[0])) + kl(soft(teacher[1]), soft(student[1]))) / 2
    expected = alpha * ce + (1 - alpha) * T ** 2 * kl_mean
    # argmax: position 0 both 0 (agree), position 1 student 1, teacher 2 (disagree)
    loss, m = distillation_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([labels]), alpha, T)
    assert m["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert m["kl"].item() == pytest.approx(kl_mean, rel=1e-6)
    assert m["top1_agreement"].item() == 0.5
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_masked_positions_contribute_nothing():
    student, teacher = torch.randn(2, 7, 13), torch.randn(2, 7, 13)
    labels = torch.randint(0, 13, (2, 7))
    labels[0, :4] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    before = distillation_loss(student, teacher, labels, alpha=0.5, temperature=1.5)
    changed = teacher.clone()
    changed[0, 2] = 50.0  # scores label 3: masked
    changed[1, 4:] = float("nan")  # score labels 5, 6 (masked) and nothing
    changed[0, 6] = -50.0  # the last position scores nothing
    after = distillation_loss(student, changed, labels, alpha=0.5, temperature=1.5)
    assert torch.equal(after[0], before[0])
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    changed[0, 3] = 50.0  # scores label 4: supervised, so this one counts
    assert distillation_loss(student, changed, labels, alpha=0.5, temperature=1.5)[0] != before[0]


@pytest.mark.parametrize("use_moe", [False, True], ids=["dense", "moe"])
def test_alpha_one_is_the_sft_loss_exactly(tiny, use_moe):
    student = MiniMindForCausalLM(tiny(use_moe=use_moe)).train()
    teacher = MiniMindForCausalLM(tiny(hidden_size=96)).eval()
    ids = torch.randint(3, 6400, (3, 20))
    labels = ids.clone()
    labels[:, :8] = -100
    labels[2, 15:] = -100
    batch = {"input_ids": ids, "labels": labels}
    loss, metrics = DistillationLoss(alpha=1.0, temperature=1.5, teacher=teacher)(student, batch)
    sft, sft_metrics = lm_loss(student, batch)
    assert torch.equal(loss, sft)  # to the bit; MoE: the balancing loss included once
    assert metrics["kl"] > 0 and metrics.keys() >= sft_metrics.keys()


# ----------------------------------------------------------------------------------------------------------------------
# the teacher and the data


def test_a_teacher_of_another_vocabulary_is_refused_in_one_line(work, tok, tmp_path):
    args = parse(flags(work, tmp_path))
    student = MiniMindForCausalLM(model_config(args, tok))
    other = model_config(Namespace(preset=None, use_moe=None, **TEACHER_SHAPE), tok)
    other.tokenizer_vocab = "0123456789abcdef"  # recorded beside a .pth by the trainer that made it
    save_weights(MiniMindForCausalLM(other), tmp_path / "other.pth")
    # a transformers folder with a tokenizer of its own (MiniMind's released folders are such)
    their_tok = load_tokenizer()
    their_tok.add_tokens(["<|not_ours|>"])
    save_transformers(MiniMindForCausalLM(model_config(Namespace(preset=None, use_moe=None, **TEACHER_SHAPE), tok)),
                      their_tok, tmp_path / "their-hf")
    for teacher in (tmp_path / "other.pth", tmp_path / "their-hf"):
        with pytest.raises(CheckpointMismatch) as refused:
            load_teacher(Namespace(**{**vars(args), "teacher": str(teacher)}), student)
        message = str(refused.value)
        assert "\n" not in message and f"--teacher {teacher}" in message
        assert "another tokenizer" in message and "one vocabulary" in message


def test_the_teacher_is_frozen_and_the_same_vocabulary_passes(work, tok, tmp_path, capsys):
    args = parse(flags(work, tmp_path))
    student = MiniMindForCausalLM(model_config(args, tok))
    teacher = load_teacher(args, student)
    assert teacher.config.hidden_size == 64 and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    hf = save_transformers(teacher, tok, tmp_path / "ours-hf")  # a folder whose tokenizer is ours: accepted
    assert load_teacher(Namespace(**{**vars(args), "teacher": str(hf)}), student).config.hidden_size == 64
    # an MoE teacher by stage name and MiniMind's shape flags: out/full_sft_64_moe.pth
    save_weights(MiniMindForCausalLM(model_config(Namespace(preset=None, use_moe=1, **TEACHER_SHAPE), tok)),
                 tmp_path / "full_sft_64_moe.pth")
    by_name = dict(teacher="full_sft", teacher_hidden_size=64, teacher_use_moe=1, out_dir=str(tmp_path))
    moe = load_teacher(Namespace(**{**vars(args), **by_name}), student)
    assert moe.config.use_moe and not moe.training
    ids = torch.randint(3, 6400, (2, 12))
    loss, metrics = DistillationLoss(0.5, 1.5, moe)(student, {"input_ids": ids, "labels": ids})
    assert torch.isfinite(loss) and metrics["kl"] > 0

    DistillationLoss(0.5, 1.5).setup(student, args)
    assert "starts as the teacher" not in capsys.readouterr().out
    DistillationLoss(0.5, 1.5).setup(teacher, args)  # e.g. --from_weight full_sft --teacher full_sft, one size
    assert "note: the student starts as the teacher" in capsys.readouterr().out


def test_data_kind_is_read_off_the_first_row(work, tok, tmp_path):
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat sat on the mat " * 20}] * 8)
    assert detect_kind(work / "train.jsonl") == "sft" and detect_kind(text) == "pretrain"
    args = parse(flags(work, tmp_path, "--data_path", str(text)))
    rows = distillation_data(args, tok)
    assert isinstance(rows, PretrainDataset) and (rows[0]["labels"] != -100).all()  # every token supervised
    assert isinstance(distillation_data(parse(flags(work, tmp_path)), tok), SFTDataset)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('\n{"chosen": []}\n')
    with pytest.raises(DataError, match=f"{odd}:2: neither an SFT row"):
        detect_kind(odd)


def test_eval_llm_and_the_server_know_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Make it with .*python trainer/train_distillation.py"):
        load_model("full_dist", directory=tmp_path)


def test_minimind_flags_and_defaults(tmp_path):
    data = write_jsonl(tmp_path / "mine.jsonl", arithmetic(random.Random(0), 4))
    # --device cuda: no demo defaults (parse never touches CUDA), so MiniMind's show
    args = parse(["--device", "cuda", "--data_path", str(data)])
    assert (args.learning_rate, args.epochs, args.max_seq_len, args.alpha, args.temperature) == (5e-6, 6, 340, 0.5, 1.5)
    assert (args.teacher, args.from_weight, args.save_weight) == ("full_sft", "full_sft", "full_dist")
    args = parse(["--device", "cuda", "--data_path", str(data), "--from_teacher_weight", "t.pth",
                  "--from_student_weight", "s.pth", "--student_hidden_size", "384", "--student_num_layers", "3",
                  "--student_use_moe", "1", "--teacher_num_layers", "16", "--teacher_use_moe", "1"])
    assert (args.teacher, args.from_weight, args.hidden_size, args.num_hidden_layers, args.use_moe) == \
        ("t.pth", "s.pth", 384, 3, 1)
    assert (args.teacher_num_layers, args.teacher_use_moe) == (16, 1)
    demo = parse(["--device", "cpu", "--data_path", str(data), "--student_hidden_size", "384"])
    assert (demo.hidden_size, demo.num_hidden_layers, demo.from_weight) == (384, 4, "none")  # typed flag wins


@pytest.mark.parametrize("flags,message", [(["--alpha", "2"], "--alpha 2.0 must be between 0"),
                                           (["--temperature", "0"], "--temperature 0.0 must be positive"),
                                           (["--teacher_device", "nowhere"], "--teacher_device: ")])
def test_a_bad_value_is_one_line(tmp_path, capsys, flags, message):
    data = write_jsonl(tmp_path / "mine.jsonl", arithmetic(random.Random(0), 4))
    with pytest.raises(SystemExit) as stop:
        parse(["--device", "cpu", "--data_path", str(data), *flags])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------------------------------------------------
# training


def held_out_metrics(model: torch.nn.Module, loss: DistillationLoss, rows: list) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        _, metrics = loss(model, pad_collate(rows))
    model.train()
    return {k: v.item() for k, v in metrics.items()}


def distil(work: Path, tok, out: Path, alpha: float) -> tuple[dict[str, float], dict[str, float], DistillationLoss,
                                                              torch.nn.Module]:
    """40 steps of the 32-wide student; held-out KL and agreement (at the run's temperature) before and after."""
    args = parse(flags(work, out, "--max_steps", "40", "--epochs", "20", "--learning_rate", "1e-2", "--alpha",
                       str(alpha)))
    stage = distillation_stage(args)
    held_out = list(SFTDataset(work / "held_out.jsonl", tok, 64))
    models, start = [], {}

    def setup(model, args):
        stage.setup(model, args)
        models.append(model)
        start.update(held_out_metrics(model, stage.loss_fn, held_out))

    train(dataclasses.replace(stage, setup=setup), args)
    return start, held_out_metrics(models[0], stage.loss_fn, held_out), stage.loss_fn, models[0]


def test_distillation_moves_the_student_toward_the_teacher(work, tok, tmp_path):
    """Held-out KL(teacher ‖ student) at T 1.5 and top-1 agreement, 40 steps at lr 1e-2. Measured: distilled
    (alpha 0.5) KL 1.566 -> 0.028, agreement 0.105 -> 0.81; labels alone (alpha 1) KL 0.069, agreement 0.889. The
    labels and the teacher mostly agree on the top token, so labels alone raise the agreement too; the teacher's
    whole distribution is what only distillation learns: 2.5x closer in KL."""
    start, distilled, loss_fn, student = distil(work, tok, tmp_path / "kd", alpha=0.5)
    _, labels_only, _, _ = distil(work, tok, tmp_path / "sft", alpha=1.0)
    print(f"\nstart {start}\ndistilled {distilled}\nlabels only {labels_only}")
    assert distilled["kl"] < 0.3 * start["kl"] and distilled["top1_agreement"] > start["top1_agreement"] + 0.3
    assert distilled["kl"] < 0.6 * labels_only["kl"]
    # the teacher stayed what it was: frozen, in eval mode, no part of the trained model
    assert not loss_fn.teacher.training and not any(p.requires_grad for p in loss_fn.teacher.parameters())
    assert not {id(p) for p in loss_fn.teacher.parameters()} & {id(p) for p in student.parameters()}


# ----------------------------------------------------------------------------------------------------------------------
# the script


def run_script(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWANLAB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "trainer" / "train_distillation.py"), *argv],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_saves_a_loadable_student_resumes_and_refuses_another_vocabulary(work, tmp_path):
    # MiniMind's flag names, as its README types them
    argv = ["--from_teacher_weight", "full_sft", "--teacher_hidden_size", "64", "--student_hidden_size", "32",
            "--student_num_layers", "1", "--from_student_weight", "none", "--data_path", str(work / "train.jsonl"),
            "--batch_size", "4", "--max_seq_len", "64", "--eval_size", "4", "--device", "cpu", "--log_interval", "1",
            "--save_interval", "1", "--alpha", "0.5", "--temperature", "2"]
    out = shutil.copytree(work / "out", tmp_path / "out")  # the teacher: full_sft_64.pth and its .json
    first = run_script(*argv, "--out_dir", str(out), "--max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "teacher: Params" in first.stdout and "done: 2 steps" in first.stdout
    model, _ = load_model("full_dist", hidden_size=32, directory=out, device="cpu")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 1)

    resumed = run_script(*argv, "--out_dir", str(out), "--max_steps", "3", "--from_resume", "1", "--teacher_device",
                         "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2/3" in resumed.stdout and "done: 3 steps" in resumed.stdout
    # where the teacher sits changes nothing the run computes: no note for it, only for what does
    assert [line for line in resumed.stdout.splitlines() if "[resume] note" in line] == [
        "[resume] note: --max_steps was 2, now 3"]

    config = json.loads((out / "full_sft_64.json").read_text())
    (out / "full_sft_64.json").write_text(json.dumps({**config, "tokenizer_vocab": "0123456789abcdef"}))
    refused = run_script(*argv, "--out_dir", str(out), "--max_steps", "1", "--save_weight", "other")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    error = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "another tokenizer" in error[0] and "one vocabulary" in error[0]
