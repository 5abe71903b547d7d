"""Atomic writes (model/files.py): a full disk is one clear error and leaves the previous file, files get the
permissions a plain write gives, and the temp files of a killed save can be found and cleared."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import MiniMindConfig, MiniMindForCausalLM
from model.files import REPO_ROOT, SaveError, atomic_save, atomic_write, remove_stale_temps
from model.hf_interop import save_transformers
from model.loading import load_tokenizer
from tests.ddp_train import tiny_args, token_rows
from tests.test_eval_llm import SHAPE, needs_tokenizer
from trainer import Stage, run


def raise_enospc(f):
    f.write(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def torch_save_to_a_full_disk(f):
    """torch.save meeting a full disk mid-write, as it really fails: its own RuntimeError ("[enforce fail at
    inline_container.cc] unexpected pos ..."), the OSError of the write as its context."""
    with open("/dev/full", "wb") as full:
        torch.save({"w": torch.zeros(1000, 1000)}, full)


def torch_zip_writer_fails(f):
    """The same RuntimeError with no OSError behind it (torch writing a path itself)."""
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("write", [
    raise_enospc,
    pytest.param(torch_save_to_a_full_disk, marks=pytest.mark.skipif(not Path("/dev/full").exists(),
                                                                     reason="no /dev/full")),
    torch_zip_writer_fails,
])
def test_a_full_disk_is_one_clear_error_and_the_previous_file_stays(tmp_path, write):
    target = tmp_path / "pretrain_64.pth"
    target.write_bytes(b"the good checkpoint")
    with pytest.raises(SaveError) as err:
        atomic_write(target, write)
    message = str(err.value)
    assert str(target) in message and "the previous file is intact" in message and "\n" not in message
    if write is not torch_zip_writer_fails:
        assert message.startswith("No space left on the device to save")
    else:
        assert "torch's writer failed (" in message and "lack of disk space" in message
    assert target.read_bytes() == b"the good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp file left


def test_a_failed_first_save_says_nothing_was_written_and_other_errors_pass_through(tmp_path):
    with pytest.raises(SaveError, match="nothing was written"):
        atomic_write(tmp_path / "new.pth", raise_enospc)
    with pytest.raises(ZeroDivisionError):  # a bug in the caller's write is not a disk problem
        atomic_write(tmp_path / "new.pth", lambda f: 1 / 0)
    assert list(tmp_path.iterdir()) == []


def test_the_trainer_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, capsys):
    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as exit_:
        run(Stage("pretrain", token_rows), tiny_args("--out_dir", str(tmp_path), "--max_steps", "1"))
    assert exit_.value.code == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].startswith(f"error: No space left on the device to save {tmp_path}")
    assert not any("Traceback" in line for line in errors)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640  # what a plain write creates under it
    os.umask(old)


def test_atomic_writes_leave_the_permissions_a_plain_write_would(tmp_path, umask_027):
    plain = tmp_path / "plain.json"
    plain.write_bytes(b"{}")
    atomic_write(tmp_path / "new.json", lambda f: f.write(b"{}"))
    atomic_save({"w": torch.zeros(2)}, tmp_path / "new.pth")
    assert mode(plain) == mode(tmp_path / "new.json") == mode(tmp_path / "new.pth") == umask_027
    kept = tmp_path / "private.pth"
    kept.write_bytes(b"old")
    kept.chmod(0o600)
    atomic_save({"w": torch.zeros(2)}, kept)  # writing over a file keeps its mode, as a plain write does
    assert mode(kept) == 0o600


@needs_tokenizer
def test_an_exported_folder_has_the_umask_permissions_throughout(tmp_path, umask_027):
    folder = save_transformers(MiniMindForCausalLM(MiniMindConfig(**SHAPE)), load_tokenizer(), tmp_path / "hf")
    modes = {p.name: oct(mode(p)) for p in folder.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(umask_027)}, modes


def test_the_temp_files_of_a_killed_save_are_found_and_removed(tmp_path):
    target = tmp_path / "pretrain_64.pth"
    target.write_bytes(b"the good checkpoint")
    killed = (f"import os; from model.files import atomic_write; "
              f"atomic_write({str(target)!r}, lambda f: (f.write(b'half'), f.flush(), os._exit(9)))")
    result = subprocess.run([sys.executable, "-c", killed], cwd=REPO_ROOT, capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 9, result.stderr
    [stale] = [p for p in tmp_path.iterdir() if p != target]
    assert stale.name.startswith(".pretrain_64.pth.") and stale.name.endswith(".tmp")
    others = [tmp_path / ".pretrain_64_resume.pth.0123abcd.tmp",  # another target's temp
              tmp_path / ".pretrain_64.pth.bak.0123abcd.tmp",  # that of pretrain_64.pth.bak
              tmp_path / "pretrain_64.pth.tmp", tmp_path / "notes.tmp"]
    for path in others:
        path.write_bytes(b"keep")
    assert remove_stale_temps(target) == [stale]
    assert not stale.exists() and target.read_bytes() == b"the good checkpoint"
    assert all(path.read_bytes() == b"keep" for path in others)
