"""--mix_data / --mix_ratio: general rows drawn into each epoch of a domain run (MixedRows), at the asked share, a new
draw each epoch fixed by the seed, resumable exactly, the held-out rows from the main file only; and --loss_turns
reaching the datasets."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset, Subset

from dataset import DataError, MixedRows, SFTDataset, pad_collate
from model.loading import load_tokenizer
from tests.ddp_train import TokenRows, tiny_args
from tests.test_engine import failing_loss, losses
from tests.test_lora_dpo_train import run_cli
from trainer import Stage, train
from trainer.chat_data import chat_data
from trainer.data import split_data
from trainer.runtime import Runtime
from trainer.train_lora import parse as parse_lora


class Numbered(Dataset):
    """Row i is just its number (and its source), so tests can see which rows an epoch holds."""

    def __init__(self, n: int, source: str):
        self.n, self.source = n, source

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.source, i


def test_an_epoch_is_every_main_row_plus_the_asked_share_drawn_anew_each_epoch():
    mixed = MixedRows(Numbered(40, "main"), Numbered(25, "mix"), ratio=0.2, seed=7)
    assert len(mixed) == 50 and mixed.mixed_in(range(len(mixed))) == 10  # 10 / 50 = 20 %
    epochs = []
    for epoch in range(3):
        mixed.set_epoch(epoch)
        rows = [mixed[i] for i in range(len(mixed))]
        assert [i for source, i in rows if source == "main"] == list(range(40))
        drawn = [i for source, i in rows if source == "mix"]
        assert len(drawn) == len(set(drawn)) == 10  # without replacement
        epochs.append(drawn)
    assert epochs[0] != epochs[1] != epochs[2]
    mixed.set_epoch(1)
    assert [mixed[i] for i in range(40, 50)] == [("mix", i) for i in epochs[1]]  # a function of (seed, epoch)
    assert MixedRows(Numbered(40, "main"), Numbered(25, "mix"), 0.2, seed=8).drawn.tolist() != epochs[0]


def test_a_small_mix_file_is_used_evenly():
    mixed = MixedRows(Numbered(30, "main"), Numbered(4, "mix"), ratio=0.25, seed=0)  # 10 slots, 4 mix rows
    counts = Counter(mixed[i][1] for i in range(30, 40))
    assert sorted(counts.values()) == [2, 2, 3, 3]  # two whole passes, then 2 of the 4 once more
    with pytest.raises(ValueError, match="between 0 and 1"):
        MixedRows(Numbered(30, "main"), Numbered(4, "mix"), ratio=1.0, seed=0)


def mixed_rows(args, tokenizer) -> MixedRows:
    """16 token rows plus 20 % drawn from 6 others: 20 rows, 5 steps of 4 per epoch; the draw changes each epoch."""
    return MixedRows(TokenRows(n=16, seed=0), TokenRows(n=6, seed=1), 0.2, args.seed)


def test_engine_logs_the_realised_share_and_resumes_exactly(tmp_path, capsys):
    flags = ("--max_steps", "12", "--save_interval", "7", "--epochs", "3")
    whole = train(Stage("pretrain", mixed_rows), tiny_args("--out_dir", str(tmp_path / "whole"), *flags))
    out = capsys.readouterr().out
    assert re.findall(r"\[mix\] epoch (\d): (\d+) of (\d+) rows \(([\d.]+)%\)", out) == \
        [(str(e), "4", "20", "20.0") for e in (1, 2, 3)]

    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in step 9 (epoch 2), after the save at 7
        train(Stage("pretrain", mixed_rows, loss_fn=failing_loss(8, RuntimeError("simulated crash"))),
              tiny_args("--out_dir", str(crashed), *flags))
    resumed = train(Stage("pretrain", mixed_rows), tiny_args("--out_dir", str(crashed), "--from_resume", "1", *flags))
    assert [r["step"] for r in resumed.history] == list(range(8, 13))
    assert losses(resumed) == losses(whole)[7:]  # bit for bit: the same epoch draws and positions in them


class Recorded(TokenRows):
    """TokenRows that note which rows are read, in order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: list[int] = []

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.read.append(i)
        return super().__getitem__(i)


def test_each_epoch_trains_on_its_own_draw(tmp_path):
    mix = Recorded(n=6, seed=1)
    stage = Stage("pretrain", lambda args, tok: MixedRows(TokenRows(n=16, seed=0), mix, 0.2, args.seed))
    train(stage, tiny_args("--out_dir", str(tmp_path), "--max_steps", "10", "--epochs", "2"))
    expected = MixedRows(TokenRows(n=16), TokenRows(n=6), 0.2, seed=42)  # tiny_args keeps --seed 42
    draws = []
    for epoch in range(2):
        expected.set_epoch(epoch)
        draws.append(sorted(expected.drawn.tolist()))
    assert draws[0] != draws[1]
    # the start-up check reads every row of the 20 (epoch 0's draw), then each epoch trains on its 20 rows
    assert len(mix.read) == 12 and [sorted(mix.read[4 * k:4 * k + 4]) for k in range(3)] == [draws[0], *draws]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mix")

    def chats(name: str, n: int) -> None:
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"conversations": [{"role": "user", "content": f"{name} question {i}"},
                                                      {"role": "assistant", "content": f"{name} answer {i}"}]}) + "\n")

    chats("domain", 44)
    chats("general", 30)
    (root / "dpo.jsonl").write_text(json.dumps({"chosen": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}],
                                                "rejected": [{"role": "user", "content": "hi"},
                                                             {"role": "assistant", "content": "no"}]}) + "\n")
    return root


def lora_args(files: Path, *extra: str):
    return parse_lora(["--hidden_size", "64", "--num_hidden_layers", "2", "--data_path", str(files / "domain.jsonl"),
                       "--device", "cpu", "--dtype", "float32", "--max_seq_len", "64", "--eval_size", "4",
                       "--batch_size", "5", *extra])


def test_held_out_rows_come_from_the_main_file_and_the_flags_reach_the_datasets(files):
    tok = load_tokenizer()
    args = lora_args(files, "--mix_data", str(files / "general.jsonl"), "--loss_turns", "last")
    assert args.mix_ratio == 0.2
    train_set, eval_set = split_data(chat_data(args, tok), args.eval_size, args.seed, pad_collate,
                                     Runtime(torch.device("cpu"), torch.float32), args.data_path)
    assert isinstance(train_set, MixedRows) and isinstance(train_set.main, Subset)
    main = train_set.main.dataset
    assert main.path == files / "domain.jsonl" and train_set.mix.path == files / "general.jsonl"
    assert main.loss_turns == train_set.mix.loss_turns == "last"
    assert isinstance(eval_set, Subset) and eval_set.dataset is main and len(eval_set) == 4
    assert len(train_set.main) == 40 and train_set.n_mix == 10  # 10 of 50 rows per epoch: 20 %
    assert not set(eval_set.indices) & set(train_set.main.indices)


def test_realised_share_through_the_lora_stage(files, tmp_path, capsys):
    from trainer.train_lora import LORA

    args = lora_args(files, "--mix_data", str(files / "general.jsonl"), "--from_weight", "none", "--max_steps", "2",
                     "--out_dir", str(tmp_path), "--lora_rank", "2")
    train(LORA, args)
    assert "[mix] epoch 1: 10 of 50 rows (20.0%) from --mix_data (--mix_ratio 0.2)" in capsys.readouterr().out


def test_realised_share_counts_the_rows_of_every_rank(files, tmp_path):
    """Two gloo processes train 25 of the 50 rows each: the printed share is over both."""
    flags = ["--hidden_size", "64", "--num_hidden_layers", "2", "--data_path", str(files / "domain.jsonl"),
             "--device", "cpu", "--dtype", "float32", "--max_seq_len", "64", "--eval_size", "4", "--batch_size", "5",
             "--mix_data", str(files / "general.jsonl"), "--from_weight", "none", "--max_steps", "1",
             "--out_dir", str(tmp_path), "--lora_rank", "2"]
    out = run_cli("train_lora.py", flags, nproc=2)
    assert "[mix] epoch 1: 10 of 50 rows (20.0%)" in out


def test_a_mix_file_of_another_kind_is_refused_with_its_line(files):
    args = lora_args(files, "--mix_data", str(files / "dpo.jsonl"), "--skip_bad_lines")
    with pytest.raises(DataError, match=r"--mix_data: .*dpo\.jsonl:1: expected an object with a 'conversations' "
                                        r"key.*must hold SFT rows"):
        chat_data(args, load_tokenizer())


def test_mix_flags_are_checked_at_the_command_line(files, capsys):
    for flags, message in [(["--mix_ratio", "0.3"], "--mix_ratio needs --mix_data"),
                           (["--mix_data", str(files / "general.jsonl"), "--mix_ratio", "1"], "between 0 and 1"),
                           (["--mix_data", str(files / "missing.jsonl")], "--mix_data: data file not found")]:
        with pytest.raises(SystemExit):
            lora_args(files, *flags)
        assert message in capsys.readouterr().err
    assert isinstance(chat_data(lora_args(files), load_tokenizer()), SFTDataset)  # no --mix_data: the plain rows
