"""The training engine, in process, on a tiny model and synthetic rows (fp32, CPU: every run is deterministic)."""

import io
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from model import MiniMindConfig, MiniMindForCausalLM
from model.weights import load_weights
from tests.ddp_train import TokenRows, prompt_rows, tiny_args, token_rows
from trainer import Stage, TrainingDiverged, lm_loss, lr_at, train
from trainer.checkpoint import load_resume, rescaled_step
import trainer.args
import trainer.checkpoint
import trainer.data
from dataset import DataError
from trainer.data import plan_steps
from trainer.engine import load_start_weights
from trainer.runtime import CtrlC
from trainer.step import progress_text


def tiny_model(**overrides) -> MiniMindForCausalLM:
    """The model tiny_args() trains."""
    return MiniMindForCausalLM(MiniMindConfig(**{"hidden_size": 64, "num_hidden_layers": 2, **overrides}))


def losses(result) -> list[float]:
    return [r["loss"] for r in result.history]


def resume_state(out: Path) -> dict:
    return torch.load(out / "pretrain_64_resume.pth", weights_only=True)


def failing_loss(after_calls: int, exc: Exception):
    """lm_loss that raises ``exc`` from its (after_calls+1)-th call on: a crash at a chosen step."""
    calls = 0

    def loss_fn(model, batch):
        nonlocal calls
        calls += 1
        if calls > after_calls:
            raise exc
        return lm_loss(model, batch)

    return loss_fn


def test_lr_schedule_is_minimind_cosine_after_linear_warmup():
    T, lr = 100, 5e-4
    for t in [0, 1, 37, 50, 99]:
        assert lr_at(t, T, lr) == pytest.approx(lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t / T))))
    assert lr_at(0, T, lr) == pytest.approx(lr) and lr_at(T, T, lr) == pytest.approx(0.1 * lr)
    assert [lr_at(t, T, lr, warmup=4) for t in range(4)] == pytest.approx([lr / 4, lr / 2, 3 * lr / 4, lr])
    assert lr_at(4, T, lr, warmup=4) == pytest.approx(lr)


def test_loss_falls_on_a_repeated_batch(tmp_path):
    same_rows = lambda args, tok: TokenRows(n=4, T=32)  # noqa: E731
    result = train(Stage("pretrain", same_rows), tiny_args("--out_dir", str(tmp_path), "--epochs", "30",
                                                            "--max_steps", "30", "--learning_rate", "3e-3"))
    first, last = losses(result)[0], losses(result)[-1]
    assert first > 8 and last < 0.5 * first, (first, last)


@pytest.mark.parametrize("rows", [token_rows, prompt_rows])
def test_accumulating_k_micro_batches_equals_one_big_batch(tmp_path, monkeypatch, rows):
    """Compared on the gradients: AdamW divides by their scale, so weights would hide a wrong 1/k. With prompt rows
    the micro-batches hold different numbers of supervised tokens: each must count by its tokens, not as 1/k."""
    real_clip, grads = torch.nn.utils.clip_grad_norm_, []

    def clip_and_record(params, *args, **kwargs):
        grads.append([p.grad.clone() for p in params])
        return real_clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_record)
    big = train(Stage("pretrain", rows), tiny_args("--out_dir", str(tmp_path / "a"), "--batch_size", "8",
                                                   "--max_steps", "2"))
    acc = train(Stage("pretrain", rows), tiny_args("--out_dir", str(tmp_path / "b"), "--batch_size", "2",
                                                   "--accumulation_steps", "4", "--max_steps", "2"))
    assert losses(acc) == pytest.approx(losses(big), rel=1e-5)  # the logged loss is the whole step's mean
    for a, b in zip(grads[0], grads[2]):  # first step of each run (a 1/k mistake would be a factor k)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_resume_after_a_crash_continues_the_same_run(tmp_path):
    flags = ("--max_steps", "6", "--save_interval", "3", "--accumulation_steps", "2", "--batch_size", "2")
    whole = train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path / "whole"), *flags))
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in step 4, after the save at step 3
        train(Stage("pretrain", token_rows, loss_fn=failing_loss(3 * 2, RuntimeError("simulated crash"))),
              tiny_args("--out_dir", str(crashed), *flags))
    assert resume_state(crashed)["step"] == 3
    resumed = train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(crashed), "--from_resume", "1", *flags))
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    assert losses(resumed) == losses(whole)[3:]  # bit for bit: same data position, RNG, optimizer state
    wa, wb = resume_state(tmp_path / "whole")["model"], resume_state(crashed)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_save_interrupted_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save, calls = torch.save, 0

    def save_then_fail(obj, f, *args, **kwargs):  # 1-2: weights + resume at step 2; from 3 on: the disk "fills"
        nonlocal calls
        calls += 1
        if calls > 2:
            f.write(b"half a checkpoint")
            raise OSError("No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="No space"):
        train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--save_interval", "2"))
    monkeypatch.undo()
    assert resume_state(tmp_path)["step"] == 2
    load_weights(tiny_model(), tmp_path / "pretrain_64.pth")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["pretrain_64.json", "pretrain_64.pth", "pretrain_64_resume.pth"]  # no temp files


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = 0

    def nan_at_step_5(model, batch):
        nonlocal calls
        calls += 1
        loss, metrics = lm_loss(model, batch)
        return (loss * float("nan") if calls == 5 else loss), metrics

    resume_file = tmp_path / "pretrain_64_resume.pth"
    with pytest.raises(TrainingDiverged, match=r"NaN/inf at step 5.*pretrain_64_resume.pth \(step 4\)"):
        train(Stage("pretrain", token_rows, loss_fn=nan_at_step_5),
              tiny_args("--out_dir", str(tmp_path), "--save_interval", "4", "--log_interval", "100"))
    state = resume_state(tmp_path)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert resume_file.stat().st_size > 0


class InfGradient(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("grad_clip", ["1.0", "0"])
def test_an_inf_gradient_under_a_finite_loss_stops_the_run_too(tmp_path, grad_clip):
    calls = 0

    def inf_grad_at_step_3(model, batch):
        nonlocal calls
        calls += 1
        loss, metrics = lm_loss(model, batch)
        return (InfGradient.apply(loss) if calls == 3 else loss), metrics

    with pytest.raises(TrainingDiverged, match=r"NaN/inf at step 3.*\(step 2\)"):
        train(Stage("pretrain", token_rows, loss_fn=inf_grad_at_step_3),
              tiny_args("--out_dir", str(tmp_path), "--save_interval", "2", "--max_steps", "4", "--grad_clip", grad_clip))
    state = resume_state(tmp_path)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_resume_file_of_another_stage_or_shape_is_refused(tmp_path):
    train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--max_steps", "1"))
    with pytest.raises(ValueError, match="(?s)holds a 'pretrain' run.*this is a 'full_sft' run"):
        train(Stage("full_sft", token_rows), tiny_args("--out_dir", str(tmp_path), "--from_resume", "1"))
    with pytest.raises(ValueError, match="--num_hidden_layers 2"):
        load_resume(tmp_path / "pretrain_64_resume.pth", "pretrain", tiny_model(num_hidden_layers=3).config)


def test_a_missing_from_weight_names_the_file_and_the_command_that_makes_it(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match=r"pretrain_64\.pth.*python trainer/train_pretrain\.py --hidden_size 64"):
        load_start_weights(model, "pretrain", str(tmp_path))


def test_a_bare_cuda_device_gets_an_index(monkeypatch):
    """torch.cuda.set_device refuses a device without an index, so "--device cuda" (the default on a GPU) must
    become cuda:N first. Checked here without a GPU: set_device is replaced by one that refuses the same way."""
    from trainer import runtime

    chosen = []

    def set_device(device):
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        chosen.append(device)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    rt = runtime.setup_runtime("cuda")
    assert rt.device == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]
    assert rt.dtype == torch.bfloat16


def bad_row_at(read: int) -> type[TokenRows]:
    """Rows whose ``read``-th read (counted in the process that reads them) raises a DataError."""

    class BadRowAt(TokenRows):
        reads = 0

        def __getitem__(self, i):
            BadRowAt.reads += 1
            if BadRowAt.reads == read:
                raise DataError("data.jsonl:7: malformed JSON")
            return super().__getitem__(i)

    return BadRowAt


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_bad_row_mid_epoch_keeps_the_steps_done_and_says_how_to_go_on(tmp_path, monkeypatch, workers):
    """Reads are in order (a worker prefetches, but the batches arrive in order): read 13 is the first row of step 4.
    From a worker the error comes wrapped in its traceback; the message keeps only the error."""
    monkeypatch.setattr(trainer.data, "check_supervision", lambda *args: None)  # it would read rows ahead
    rows = bad_row_at(13)
    with pytest.raises(DataError) as err:
        train(Stage("pretrain", lambda args, tok: rows()), tiny_args("--out_dir", str(tmp_path), "--num_workers", workers))
    assert str(err.value).startswith("data.jsonl:7: malformed JSON\nStopped (saved step 3). Fix that line in place")
    assert "--skip_bad_lines" in str(err.value) and "--from_resume 1" in str(err.value)
    assert resume_state(tmp_path)["step"] == 3


def test_a_bad_first_row_of_a_new_run_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.data, "check_supervision", lambda *args: None)
    train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--max_steps", "2"))
    before = (tmp_path / "pretrain_64.pth").read_bytes()
    rows = bad_row_at(1)
    with pytest.raises(DataError, match=r"Stopped \(nothing saved by this run\)"):
        train(Stage("pretrain", lambda args, tok: rows()), tiny_args("--out_dir", str(tmp_path)))
    assert (tmp_path / "pretrain_64.pth").read_bytes() == before and resume_state(tmp_path)["step"] == 2


def test_batches_count_by_supervised_tokens_unless_the_stage_says_otherwise():
    batch = {"labels": torch.tensor([[5, 6, -100, 7], [-100, -100, 8, 9]])}  # shifted: 2 + 2 supervised positions
    assert Stage("pretrain", token_rows).loss_weight(batch) == 4
    assert Stage("custom", token_rows, loss_weight=lambda batch: 2.5).loss_weight(batch) == 2.5


def test_zero_intervals_mean_at_the_end_and_bad_sizes_are_clear(tmp_path, capsys):
    result = train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--max_steps", "3",
                                                            "--save_interval", "0", "--log_interval", "0"))
    assert [r["step"] for r in result.history] == [3] and resume_state(tmp_path)["step"] == 3
    with pytest.raises(ValueError, match="--eval_size 64 leaves no rows to train on: the data has 64"):
        train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--eval_size", "64"))
    with pytest.raises(ValueError, match="has no rows"):
        train(Stage("pretrain", lambda args, tok: TokenRows(n=0)), tiny_args("--out_dir", str(tmp_path)))


def test_rows_that_supervise_nothing_get_a_warning(tmp_path, capsys):
    def unsupervised(args, tok):
        rows = TokenRows()
        rows.labels[::2] = -100  # every other row: a prompt cut off before its reply
        return rows

    train(Stage("pretrain", unsupervised), tiny_args("--out_dir", str(tmp_path), "--max_steps", "1"))
    assert "[data] warning: 32 of 64 sampled rows have no supervised token" in capsys.readouterr().out


def test_resume_notes_changed_settings_and_refuses_other_lora_shapes(tmp_path, capsys):
    from model.model_lora import apply_lora

    def lora(rank):
        return Stage("lora", token_rows, setup=lambda model, args: apply_lora(model, rank=rank))

    flags = ("--out_dir", str(tmp_path), "--max_steps", "2", "--save_interval", "2")
    train(lora(2), tiny_args(*flags))
    train(lora(2), tiny_args(*flags, "--max_steps", "3", "--learning_rate", "5e-4", "--grad_clip", "0.5",
                             "--from_resume", "1", "--log_interval", "3"))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[resume] note")]
    assert notes == ["[resume] note: --grad_clip was 1.0, now 0.5", "[resume] note: --learning_rate was 0.001, now 0.0005",
                     "[resume] note: --max_steps was 2, now 3"]  # not --from_resume or --log_interval
    with pytest.raises(ValueError, match=r"(?s)does not fit.*lora_A: file has \(2, 64\), model has \(4, 64\)"):
        train(lora(4), tiny_args(*flags, "--max_steps", "4", "--from_resume", "1"))


def test_a_new_global_batch_resumes_at_the_same_row_end_to_end(tmp_path, monkeypatch):
    """44 rows, batch 8: 5 steps an epoch (4 rows dropped). Saved at step 7 = epoch 1 after 16 of its rows; resumed
    with batch 4 the run must go on with rows 16-19 of epoch 1's order."""
    from torch.utils.data import DistributedSampler

    monkeypatch.setattr(trainer.data, "check_supervision", lambda *args: None)
    reads = []

    class Recorded(TokenRows):
        def __getitem__(self, i):
            reads.append(i)
            return super().__getitem__(i)

    rows = lambda args, tok: Recorded(n=44)  # noqa: E731
    flags = ("--out_dir", str(tmp_path), "--epochs", "3", "--save_interval", "7")
    train(Stage("pretrain", rows), tiny_args(*flags, "--batch_size", "8", "--max_steps", "7"))
    reads.clear()
    train(Stage("pretrain", rows), tiny_args(*flags, "--batch_size", "4", "--max_steps", "16", "--from_resume", "1"))
    epoch_1 = DistributedSampler(Recorded(n=44), num_replicas=1, rank=0, seed=42)
    epoch_1.set_epoch(1)
    assert reads[:4] == list(epoch_1)[16:20]


@pytest.mark.parametrize("saved, new", [((7, 8, 5), (4, 11)), ((3, 8, 5), (16, 2)), ((7, 8, None), (4, 11))])
def test_a_new_global_batch_resumes_at_the_same_epoch_and_row(saved, new):
    """44 rows: batch 8 makes 5 steps an epoch (4 rows dropped), batch 4 makes 11, batch 16 makes 2."""
    step, batch, per_epoch = saved
    expected = {(7, 8, 5): 11 + 16 // 4, (3, 8, 5): 24 // 16, (7, 8, None): 56 // 4}[saved]
    assert rescaled_step(step, batch, per_epoch, *new) == expected


def test_a_resume_under_another_vocabulary_is_refused(tmp_path, monkeypatch):
    train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--max_steps", "2"))
    monkeypatch.setattr(trainer.args, "vocab_fingerprint", lambda tokenizer: "another-tokenizer")
    with pytest.raises(ValueError, match="trained with another tokenizer.*resume with the one the run was started"):
        train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--max_steps", "3",
                                                       "--from_resume", "1"))


def test_a_stage_whose_batches_have_no_labels_trains_with_its_own_loss_weight(tmp_path):
    """E.g. a loss per row: the start-up check of supervised tokens has nothing to look at."""
    def rows_only(items):
        return {"input_ids": torch.stack([item["input_ids"] for item in items])}

    def next_token_loss(model, batch):
        ids = batch["input_ids"]
        return model(input_ids=ids, labels=ids).loss, {}

    stage = Stage("pretrain", token_rows, loss_fn=next_token_loss, collate=rows_only,
                  loss_weight=lambda batch: len(batch["input_ids"]))
    result = train(stage, tiny_args("--out_dir", str(tmp_path), "--max_steps", "2", "--eval_size", "8"))
    assert result.steps == 2 and math.isfinite(result.history[-1]["eval/loss"])


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--max_steps", "2"))
    before = (tmp_path / "pretrain_64.pth").read_bytes(), (tmp_path / "pretrain_64_resume.pth").read_bytes()
    result = train(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--max_steps", "2",
                                                            "--from_resume", "1"))
    assert result.steps == 2 and result.history == []
    assert "already at step 2 of 2: nothing to train. Raise --max_steps" in capsys.readouterr().out
    assert ((tmp_path / "pretrain_64.pth").read_bytes(), (tmp_path / "pretrain_64_resume.pth").read_bytes()) == before


def test_held_out_rows_whose_documents_cover_the_data_are_a_clear_error(tmp_path, capsys):
    """One long document: every row shares it with the held-out row, so nothing is left to train on."""
    from dataset import PretrainDataset

    data = tmp_path / "one_doc.jsonl"
    data.write_text('{"text": "' + "a long story about a tiny model " * 60 + '"}\n')
    stage = Stage("pretrain", lambda args, tok: PretrainDataset(data, tok, 32, cache_dir=tmp_path / "cache"))
    with pytest.raises(DataError, match=r"--eval_size 1 leaves no rows to train on \(with the \d+ that share"):
        train(stage, tiny_args("--out_dir", str(tmp_path), "--eval_size", "1"))
    assert "rows share a document with held-out rows: left out of training" in capsys.readouterr().out


def test_the_time_budget_is_honoured_within_one_step_and_the_plan_says_its_steps(tmp_path, capsys):
    """Steps of >= 0.2 s and a 1 s budget (set-up counted): the run stops within a step of it, not at the next log
    point (--log_interval 100), and saves there. The start-up line says what decided the number of steps."""
    def slow_loss(model, batch):
        time.sleep(0.2)
        return lm_loss(model, batch)

    result = train(Stage("pretrain", token_rows, loss_fn=slow_loss),
                   tiny_args("--out_dir", str(tmp_path), "--epochs", "10", "--max_steps", "50", "--log_interval", "100",
                             "--time_budget", "1"))
    assert result.stopped == "time_budget" and 1 <= result.steps <= 5
    assert resume_state(tmp_path)["step"] == result.steps and [r["step"] for r in result.history] == [result.steps]
    out = capsys.readouterr().out
    assert "50 steps of 4 rows (--max_steps 50; an epoch is 16), at most 1s (--time_budget)" in out
    assert f"[time] --time_budget 1s reached at step {result.steps}/50; saved step {result.steps}" in out


def test_the_plan_names_what_decided_its_steps():
    assert plan_steps(64, 4, 1, 1, epochs=2, max_steps=0).describe() == "32 steps of 4 rows (2 epochs of 16)"
    assert plan_steps(64, 4, 1, 1, epochs=2, max_steps=300).describe() == \
        "32 steps of 4 rows (2 epochs of 16; --max_steps 300 is more than the data makes)"
    assert plan_steps(64, 2, 2, 2, epochs=1, max_steps=5).describe() == \
        "5 steps of 8 rows (--max_steps 5; an epoch is 8)"


def test_a_kill_between_the_weights_and_the_resume_file_is_mended_on_resume(tmp_path, monkeypatch, capsys):
    """The save at step 4 writes the weights, then dies writing the resume file (as kill -9 would: its temp file
    stays). Resuming finds a weights file newer than the resume file (step 2) and writes both again from the resume
    state; the next save also clears the temp files such kills left."""
    real_save_resume, saves = trainer.checkpoint.save_resume, 0

    def killed_at_the_second_save(path, **state):
        nonlocal saves
        saves += 1
        if saves == 2:
            (path.parent / f".{path.name}.k1ll3d.tmp").write_bytes(b"half a resume file")
            raise SystemExit("killed")
        real_save_resume(path, **state)

    monkeypatch.setattr(trainer.checkpoint, "save_resume", killed_at_the_second_save)
    flags = ("--out_dir", str(tmp_path), "--max_steps", "4", "--save_interval", "2")
    with pytest.raises(SystemExit):
        train(Stage("pretrain", token_rows), tiny_args(*flags))
    monkeypatch.undo()
    (tmp_path / ".pretrain_64.pth.0ld.tmp").write_bytes(b"half a weights file")  # an older kill's
    assert resume_state(tmp_path)["step"] == 2

    result = train(Stage("pretrain", token_rows), tiny_args(*flags, "--max_steps", "2", "--from_resume", "1"))
    assert result.steps == 2 and "is not the file saved with" in capsys.readouterr().out
    weights, resumed = torch.load(tmp_path / "pretrain_64.pth", weights_only=True), resume_state(tmp_path)
    assert resumed["step"] == 2
    assert all(torch.equal(weights[k], v.to(weights[k].dtype)) for k, v in resumed["model"].items())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["pretrain_64.json", "pretrain_64.pth", "pretrain_64_resume.pth"]  # no temp file left
    train(Stage("pretrain", token_rows), tiny_args(*flags, "--max_steps", "2", "--from_resume", "1"))
    assert "is not the file saved with" not in capsys.readouterr().out  # they agree now


def test_the_first_ctrl_c_is_a_request_and_the_second_aborts():
    usual = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, wherever pytest runs
    try:
        with CtrlC(announce=False) as ctrl_c:
            os.kill(os.getpid(), signal.SIGINT)
            assert ctrl_c.pressed
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual Ctrl-C again
    finally:
        signal.signal(signal.SIGINT, usual)


def test_the_bar_shows_four_digits_and_leaves_room_for_the_bar_on_140_columns():
    """DPO logs four metrics of its own, in training and in eval: none of them may squash the bar."""
    metrics = ("reward_margin", "chosen_reward", "rejected_reward", "accuracy", "grad_norm")
    record = {"loss": 4.0012, "eval/loss": 4.001, "lr": 5e-6, "tokens_per_s": 123456.0, "mfu": 0.4321,
              **{f"train/{k}": 0.123456 for k in metrics}, **{f"eval/{k}": 0.654321 for k in metrics[:4]}}
    assert "loss 4.001 eval_loss 4.001" in progress_text(record)
    screen = io.StringIO()
    with tqdm(total=200, ncols=140, file=screen, mininterval=0, ascii=True) as bar:
        bar.set_postfix_str(progress_text(record))
        bar.update(90)
    line = screen.getvalue().split("\r")[-1].strip()
    assert len(line) <= 140 and line.count("#") >= 10, line
