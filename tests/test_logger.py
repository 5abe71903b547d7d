"""swanlab for real (offline: no network), and the promise that logging never stops a training run."""

import pytest
import torch

from tests.ddp_train import tiny_args, token_rows
from trainer import Stage, train
from trainer.logger import NullLogger, SwanlabLogger, make_logger


def run_files(folder):
    return list(folder.glob("run-*/run-*.swanlab"))


def test_swanlab_offline_writes_the_run_to_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    logger = SwanlabLogger("minimind-test", "pretrain-64", {"learning_rate": 1e-3}, log_dir=tmp_path)
    for step in (1, 2, 3):
        logger.log({"loss": 8.0 / step, "train/accuracy": 0.1 * step}, step)
    logger.finish()
    [run] = run_files(tmp_path)
    assert logger.run_id and logger.run_id in run.name and run.stat().st_size > 0


def test_not_logged_in_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SWANLAB_MODE", raising=False)
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no stored key
    logger = SwanlabLogger("minimind-test", "run", {}, log_dir=tmp_path / "swanlog")
    logger.log({"loss": 1.0}, 1)
    logger.finish()
    assert "not logged in, logging offline" in capsys.readouterr().out
    assert run_files(tmp_path / "swanlog")


def test_a_logging_failure_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    import swanlab

    monkeypatch.setenv("SWANLAB_MODE", "offline")
    logger = SwanlabLogger("minimind-test", "run", {}, log_dir=tmp_path)
    calls = []

    def broken_log(*args, **kwargs):
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(swanlab, "log", broken_log)
    with pytest.warns(UserWarning, match="swanlab failed .*disk full.*training goes on"):
        logger.log({"loss": 1.0}, 1)
    logger.log({"loss": 0.5}, 2)  # no second warning, no exception: logging is off now
    logger.finish()
    assert len(calls) == 1
    swanlab.finish()  # the logger gave up on the run; close it here so it does not report at interpreter exit


def test_only_rank_zero_logs_and_only_when_asked():
    assert type(make_logger(False, True, "p", "n", {})) is NullLogger
    assert type(make_logger(True, False, "p", "n", {})) is NullLogger


def test_a_resumed_run_logs_to_the_same_swanlab_run(tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_MODE", "offline")
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    flags = ("--out_dir", str(tmp_path), "--use_wandb", "--save_interval", "2")
    train(Stage("pretrain", token_rows), tiny_args(*flags, "--max_steps", "2"))
    run_id = torch.load(tmp_path / "pretrain_64_resume.pth", weights_only=True)["run_id"]
    train(Stage("pretrain", token_rows), tiny_args(*flags, "--max_steps", "4", "--from_resume", "1"))
    runs = run_files(tmp_path / "swanlog")
    assert run_id and len(runs) == 2 and all(run.name == f"run-{run_id}.swanlab" for run in runs)
