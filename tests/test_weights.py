"""A file that is no loadable checkpoint is one line saying what it is, in code (load_model) and in the tools."""

import pytest
import torch
from safetensors.torch import save_file

import eval_llm
from model.files import REPO_ROOT
from model.loading import load_model
from model.model_lora import read_lora_file
from model.weights import CheckpointMismatch
from tests.test_eval_llm import run


def good_pth(path):
    torch.save({"model.embed_tokens.weight": torch.randn(64, 16)}, path)
    return path.read_bytes()


BAD_FILES = {  # name -> (how to make it, what the message must say)
    "empty.pth": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "truncated.pth": (lambda p: p.write_bytes(good_pth(p)[:2000]), "is truncated or damaged"),
    "cut_short.pth": (lambda p: p.write_bytes(good_pth(p)[:10]), "is truncated or damaged"),
    "text.pth": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\n"),
                 "is not a PyTorch checkpoint (it is text: 'version https://git-lfs.github.com/spec/v1')"),
    "list.pth": (lambda p: torch.save([torch.zeros(2)], p), "holds a list, not a state dict"),
    "module.pth": (lambda p: torch.save(torch.nn.Linear(2, 2), p), "holds pickled Python objects"),
    "truncated.safetensors": (lambda p: (save_file({"w": torch.zeros(8)}, p), p.write_bytes(p.read_bytes()[:-8])),
                              "is truncated or damaged"),
    "text.safetensors": (lambda p: p.write_text("<html>Not Found</html>"), "is not a safetensors checkpoint"),
}


@pytest.fixture(params=list(BAD_FILES))
def bad_file(request, tmp_path):
    make, says = BAD_FILES[request.param]
    path = tmp_path / request.param
    make(path)
    return path, says


def test_a_bad_file_is_a_checkpoint_error_naming_it(bad_file):
    path, says = bad_file
    with pytest.raises(CheckpointMismatch) as err:
        load_model(path, device="cpu")
    assert str(err.value).startswith(f"{path} {says}") and "\n" not in str(err.value)


def test_eval_llm_prints_one_line_for_a_bad_file(bad_file):
    path, says = bad_file
    with pytest.raises(SystemExit) as exit_:
        eval_llm.main(["--load_from", str(path)])
    assert str(exit_.value.code).startswith(f"error: {path} {says}") and "\n" not in str(exit_.value.code)


def test_eval_llm_as_users_run_it_prints_the_line_without_a_traceback(tmp_path):
    path = tmp_path / "model.pth"
    path.write_text("not weights\n")
    result = run(str(REPO_ROOT / "eval_llm.py"), "--load_from", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {path} is not a PyTorch checkpoint (it is text: 'not weights')"


def test_a_bad_lora_file_gets_the_same_words(tmp_path):
    path = tmp_path / "lora_x_64.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointMismatch, match="is empty"):
        read_lora_file(path)
