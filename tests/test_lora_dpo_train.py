"""The LoRA and DPO stages: the DPO loss and log-probs against hand values and loops, training through the engine
in process, and both scripts end to end on the command line (one process and 2-process gloo DDP)."""

import dataclasses
import json
import math
import os
import runpy
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from dataset import DPODataset, train_eval_split
from model import MiniMindForCausalLM
from model.files import REPO_ROOT
from model.loading import load_model, load_tokenizer
from model.weights import load_weights, save_weights
from model.model_lora import DoRALinear, LoRALinear, load_lora, read_lora_file
from trainer import Stage, train
from trainer.args import model_config
from trainer.step import evaluate
from trainer.runtime import Runtime
from trainer.train_dpo import dpo_loss, dpo_stage, pair_collate, sequence_logps
from trainer.train_dpo import parse as parse_dpo
from trainer.train_lora import LORA
from trainer.train_lora import parse as parse_lora

SHAPE = ["--hidden_size", "64", "--num_hidden_layers", "2"]
LN2 = math.log(2)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def work(tmp_path_factory, tok) -> Path:
    """A tiny random 'full_sft' checkpoint in out/, an SFT file (24 rows) and a DPO file (24 pairs)."""
    root = tmp_path_factory.mktemp("stages")
    config = model_config(Namespace(preset=None, hidden_size=64, num_hidden_layers=2, use_moe=None), tok)
    torch.manual_seed(0)
    save_weights(MiniMindForCausalLM(config), root / "out" / "full_sft_64.pth")
    user = lambda i: {"role": "user", "content": f"Who are you? ({i})"}  # noqa: E731
    reply = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    with open(root / "sft.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"conversations": [user(i), reply(f"I am MiniMind, model {i}.")]}) + "\n")
    with open(root / "dpo.jsonl", "w") as f:
        for i in range(24):
            f.write(json.dumps({"chosen": [user(i), reply(f"I am MiniMind, a small model ({i}).")],
                                "rejected": [user(i), reply("no no no no no")]}) + "\n")
    return root


def flags(work: Path, out: Path, data: str, *extra: str) -> list[str]:
    """A 64-wide fp32 CPU run on the fixture's data, from its full_sft checkpoint, logging every step."""
    return [*SHAPE, "--data_path", str(work / data), "--from_weight", str(work / "out" / "full_sft_64.pth"),
            "--out_dir", str(out), "--batch_size", "4", "--max_seq_len", "64", "--dtype", "float32", "--device", "cpu",
            "--log_interval", "1", "--eval_size", "4", *extra]


def capturing(stage: Stage, models: list) -> Stage:
    """``stage`` whose setup also hands over the model the engine trains."""
    def setup(model, args):
        stage.setup(model, args)
        models.append(model)
    return dataclasses.replace(stage, setup=setup)


# ----------------------------------------------------------------------------------------------------------------------
# DPO: the pure pieces


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    logps = torch.randn(2, 5) * 20
    loss, m = dpo_loss(logps[0], logps[1], logps[0], logps[1], beta=0.1)
    assert loss.item() == pytest.approx(LN2, abs=1e-7)
    assert m["reward_margin"].item() == m["chosen_reward"].item() == m["rejected_reward"].item() == 0
    assert m["accuracy"].item() == 0  # a tie is not a win


def test_dpo_loss_hand_computed():
    # pair 1: chosen gains 1 nat over the reference, rejected loses 2 -> reward 0.5, -1.0, margin 1.5
    # pair 2: chosen loses 1 nat, rejected unchanged                   -> reward -0.5, 0.0, margin -0.5
    loss, m = dpo_loss(torch.tensor([-9.0, -5.0]), torch.tensor([-14.0, -7.0]), torch.tensor([-10.0, -4.0]),
                       torch.tensor([-12.0, -7.0]), beta=0.5)
    expected = (math.log(1 + math.exp(-1.5)) + math.log(1 + math.exp(0.5))) / 2  # -log σ(x) = log(1 + e^-x)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["chosen_reward"].item() == pytest.approx(0.0)
    assert m["rejected_reward"].item() == pytest.approx(-0.5)
    assert m["reward_margin"].item() == pytest.approx(0.5)
    assert m["accuracy"].item() == 0.5


def test_sequence_logps_match_a_loop():
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    labels[2, 1:] = -100  # nothing supervised (a reply cut off by truncation)
    logp = F.log_softmax(logits, -1)
    total, count = torch.zeros(3), torch.zeros(3)
    for b in range(3):
        for t in range(1, 7):  # the logits at t-1 score the label at t
            if labels[b, t] != -100:
                total[b] += logp[b, t - 1, labels[b, t]]
                count[b] += 1
    torch.testing.assert_close(sequence_logps(logits, labels), total)
    torch.testing.assert_close(sequence_logps(logits, labels, length_norm=True), total / count.clamp(min=1))
    assert sequence_logps(logits, labels)[2] == 0


def test_pair_collate_puts_chosen_then_rejected_at_one_length():
    items = [{"chosen_input_ids": torch.tensor([5, 6, 7]), "chosen_labels": torch.tensor([-100, 6, 7]),
              "rejected_input_ids": torch.tensor([5, 8]), "rejected_labels": torch.tensor([-100, 8])},
             {"chosen_input_ids": torch.tensor([9]), "chosen_labels": torch.tensor([9]),
              "rejected_input_ids": torch.tensor([9, 3, 4, 2]), "rejected_labels": torch.tensor([-100, 3, 4, 2])}]
    batch = pair_collate(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 3, 4, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [9, -100, -100, -100], [-100, 8, -100, -100],
                                        [-100, 3, 4, 2]]


# ----------------------------------------------------------------------------------------------------------------------
# in process, through the engine


def test_dpo_eval_is_a_mean_over_pairs_when_the_last_batch_is_smaller():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(model_config(Namespace(preset=None, hidden_size=64, num_hidden_layers=2,
                                                       use_moe=None), load_tokenizer())).eval()
    stage = dpo_stage(Namespace(beta=0.1, dpo_length_norm=False))
    stage.setup(model, Namespace())
    with torch.no_grad():  # a policy away from its reference, so the pairs' losses differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [torch.randint(3, 6400, (16,)) for _ in range(10)]
    pairs = [{"chosen_input_ids": c, "chosen_labels": c, "rejected_input_ids": r, "rejected_labels": r}
             for c, r in zip(rows[::2], rows[1::2])]
    got = evaluate(model, stage, pairs, 4, Runtime(torch.device("cpu"), torch.float32))
    per_pair = [stage.loss_fn(model, pair_collate([pair]))[0].item() for pair in pairs]
    assert got["eval/loss"] == pytest.approx(sum(per_pair) / 5, rel=1e-5)  # 5 pairs in batches of 4 + 1


def test_dpo_training_starts_at_ln2_and_learns_the_training_pairs(work, tok, tmp_path):
    args = parse_dpo(flags(work, tmp_path, "dpo.jsonl", "--epochs", "2", "--learning_rate", "1e-3"))
    stage, models = dpo_stage(args), []
    result = train(capturing(stage, models), args)
    policy, reference = models[0].eval(), stage.loss_fn.reference
    assert reference is not policy and not any(p.requires_grad for p in reference.parameters())
    first, last = result.history[0], result.history[-1]
    assert first["loss"] == pytest.approx(LN2, abs=1e-5)  # step 1 is computed before any update
    assert first["train/reward_margin"] == pytest.approx(0, abs=1e-5)
    assert {"eval/loss", "eval/reward_margin", "eval/chosen_reward", "eval/rejected_reward", "eval/accuracy"} <= set(last)

    train_rows, _ = train_eval_split(DPODataset(work / "dpo.jsonl", tok, 64), eval_size=4, seed=args.seed)
    batch = pair_collate(list(train_rows))
    with torch.no_grad():
        loss, m = stage.loss_fn(policy, batch)
        start, _ = stage.loss_fn(reference, batch)
    assert start.item() == pytest.approx(LN2, abs=1e-6)
    assert loss.item() < 0.5 and m["reward_margin"].item() > 0.5 and m["accuracy"].item() == 1
    assert m["chosen_reward"].item() > m["rejected_reward"].item()


def test_lora_trains_only_the_adapter_and_saves_only_it(work, tok, tmp_path, capsys):
    args = parse_lora(flags(work, tmp_path, "sft.jsonl", "--max_steps", "4", "--learning_rate", "1e-2"))
    models = []
    train(capturing(LORA, models), args)
    trained = models[0].eval()
    assert "trainable" in capsys.readouterr().out

    base = load_weights(MiniMindForCausalLM(trained.config), work / "out" / "full_sft_64.pth").eval()
    trained_state = trained.state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(trained_state[name], tensor), f"{name} changed"  # bit-identical base

    config, weights = read_lora_file(tmp_path / "lora" / "lora_identity_64.pth")
    layers = [name for name, m in trained.named_modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 7  # q/k/v/o + gate/up/down in each of the 2 layers
    assert sorted(weights) == sorted(f"{layer}.lora_{ab}" for layer in layers for ab in "AB")
    assert all(weights[f"{layer}.lora_B"].abs().sum() > 0 for layer in layers)  # B left zero: nothing trained

    load_lora(base, tmp_path / "lora" / "lora_identity_64.pth")
    x = torch.randint(3, len(tok), (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(base(x).logits, trained(x).logits, rtol=0, atol=0)


def test_dora_trains_leaves_the_base_alone_and_merges_with_convert_model(work, tok, tmp_path, monkeypatch):
    args = parse_lora(flags(work, tmp_path, "sft.jsonl", "--max_steps", "4", "--learning_rate", "1e-2",
                            "--lora_type", "dora", "--lora_name", "dora"))
    models = []
    train(capturing(LORA, models), args)
    trained = models[0].eval()
    base = load_weights(MiniMindForCausalLM(trained.config), work / "out" / "full_sft_64.pth").eval()
    trained_state = trained.state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(trained_state[name], tensor), f"{name} changed"  # bit-identical base

    adapter = tmp_path / "lora" / "lora_dora_64.pth"
    config, weights = read_lora_file(adapter)
    layers = [name for name, m in trained.named_modules() if isinstance(m, DoRALinear)]
    assert config["lora_type"] == "dora" and len(layers) == 2 * 7
    assert sorted(weights) == sorted(f"{layer}.lora_{t}" for layer in layers for t in ("A", "B", "magnitude"))
    assert all(not torch.equal(weights[f"{layer}.lora_magnitude"], base.get_submodule(layer).weight.norm(dim=1))
               for layer in layers)  # m trained

    x = torch.randint(3, len(tok), (2, 16))
    with torch.no_grad():
        expected = trained(x).logits
    load_lora(base, adapter)  # no flag: the file says DoRA
    with torch.no_grad():
        torch.testing.assert_close(base(x).logits, expected, rtol=0, atol=0)

    convert = runpy.run_path(str(REPO_ROOT / "scripts" / "convert_model.py"))["main"]
    monkeypatch.setattr(sys, "argv", ["convert_model.py", "--weight", str(work / "out" / "full_sft_64.pth"),
                                      "--merge_lora", str(adapter), "--output", str(tmp_path / "merged-hf")])
    convert()
    merged, _ = load_model(tmp_path / "merged-hf", device="cpu")
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# end to end on the command line


def run_cli(script: str, argv: list[str], nproc: int = 1) -> str:
    launcher = [sys.executable] if nproc == 1 else \
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc)]
    env = {**os.environ, "SWANLAB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, str(REPO_ROOT / "trainer" / script), *argv], capture_output=True, text=True,
                          env=env, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if "Error" in line]  # torchrun's summary hides the cause
    assert proc.returncode == 0, "\n".join([proc.stdout[-2000:], *errors[-10:], proc.stderr[-2000:]])
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_dpo_cli(work, tmp_path, nproc):
    out = run_cli("train_dpo.py", flags(work, tmp_path, "dpo.jsonl", "--max_steps", "2"), nproc)
    assert "done: 2 steps" in out
    assert (tmp_path / "dpo_64.pth").is_file() and (tmp_path / "dpo_64_resume.pth").is_file()


@pytest.mark.parametrize("nproc", [1, 2])
def test_lora_cli(work, tmp_path, nproc):
    out = run_cli("train_lora.py", flags(work, tmp_path, "sft.jsonl", "--lora_name", "me", "--max_steps", "2"), nproc)
    assert "trainable" in out
    _, weights = read_lora_file(tmp_path / "lora" / "lora_me_64.pth")
    assert weights and all(k.startswith("model.layers.") and k.endswith((".lora_A", ".lora_B")) for k in weights)


def test_lora_cli_resume(work, tmp_path):
    argv = flags(work, tmp_path, "sft.jsonl", "--lora_targets", "square", "--save_interval", "1")
    run_cli("train_lora.py", argv + ["--max_steps", "2"])
    first = read_lora_file(tmp_path / "lora" / "lora_identity_64.pth")[1]
    out = run_cli("train_lora.py", argv + ["--max_steps", "4", "--from_resume", "1"])
    assert "at step 2/4" in out
    config, weights = read_lora_file(tmp_path / "lora" / "lora_identity_64.pth")
    assert all(t.endswith(("q_proj", "o_proj")) for t in config["targets"])  # square layers under GQA
    assert weights.keys() == first.keys() and any(not torch.equal(weights[k], first[k]) for k in weights)
