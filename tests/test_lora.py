"""LoRA and DoRA: exact at init, train only their own tensors, merge, save/load, and match peft's numbers."""

import copy
import re

import pytest
import torch
from torch import nn

from model import MiniMindConfig, MiniMindForCausalLM
from model.files import REPO_ROOT
from model.weights import load_weights, save_weights
from model.model_lora import (
    DoRALinear, LoRALinear, apply_lora, load_lora, lora_parameter_count, lora_path, lora_state_dict, lora_summary,
    merge_lora, read_lora_file, save_lora,
)

MOE = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)


def _tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 6400, (batch, length))


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def _randomize_lora(model: nn.Module, std: float = 0.05) -> None:
    """Non-zero B (and a new A), so the LoRA path actually changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)


def _train_a_few_steps(model: nn.Module, steps: int = 3) -> dict[str, torch.Tensor]:
    """AdamW on the trainable parameters, lr 1e-2, on random tokens; returns the state dict after."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        x = _tokens()
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.state_dict()


def _base_and_lora(config: MiniMindConfig, **lora) -> tuple[MiniMindForCausalLM, MiniMindForCausalLM, list[str]]:
    base = MiniMindForCausalLM(config).eval()
    model = copy.deepcopy(base)
    return base, model, apply_lora(model, **lora)


def test_init_output_equals_base_and_base_keys_unchanged(tiny):
    base, model, names = _base_and_lora(tiny(), rank=4)
    x = _tokens()
    assert torch.equal(_logits(model, x), _logits(base, x))  # B = 0: exactly the base model
    keys, base_keys = set(model.state_dict()), set(base.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == {f"{n}.lora_{m}" for n in names for m in "AB"}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.state_dict().items())


def test_training_changes_only_lora(tiny):
    base, model, _ = _base_and_lora(tiny(), rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora_[AB]$", name) for name in trainable)

    after = _train_a_few_steps(model)
    for key in base.state_dict():
        assert torch.equal(after[key], before[key]), f"base weight {key} changed"
    lora_keys = [k for k in after if ".lora_" in k]
    assert all(not torch.equal(after[k], before[k]) for k in lora_keys), "every LoRA matrix should have moved"
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)


def test_merge_matches_and_leaves_a_plain_checkpoint(tiny, tmp_path):
    base, model, _ = _base_and_lora(tiny(), rank=4, alpha=8)
    _randomize_lora(model)
    x = _tokens()
    with_lora = _logits(model, x)
    assert not torch.allclose(with_lora, _logits(base, x), atol=1e-4)  # the update is not a no-op

    merged = merge_lora(model)
    assert torch.allclose(_logits(merged, x), with_lora, atol=1e-5)
    assert list(merged.state_dict()) == list(base.state_dict())
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    # An ordinary checkpoint: loads into a model built without any LoRA code.
    save_weights(merged, tmp_path / "merged.pth", dtype=torch.float32)
    fresh = load_weights(MiniMindForCausalLM(tiny()).eval(), tmp_path / "merged.pth")
    assert torch.equal(_logits(fresh, x), _logits(merged, x))


def test_save_then_load_onto_a_fresh_base(tiny, tmp_path):
    base, model, names = _base_and_lora(tiny(), rank=4, alpha=16)
    _randomize_lora(model)
    x = _tokens()
    path = save_lora(model, tmp_path / "lora" / "lora_test_64.pth")

    data = torch.load(path, weights_only=True)  # no pickled code needed
    assert data["lora_config"]["rank"] == 4 and data["lora_config"]["alpha"] == 16
    assert data["lora_config"]["targets"] == names and data["lora_config"]["hidden_size"] == 64
    assert set(data["weights"]) == set(lora_state_dict(model))

    fresh = copy.deepcopy(base)
    assert load_lora(fresh, path) == names
    assert torch.equal(_logits(fresh, x), _logits(model, x))

    half = save_lora(model, tmp_path / "half.pth", dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in torch.load(half, weights_only=True)["weights"].values())
    load_lora(fresh, half)  # into the existing LoRA layers, cast back to fp32
    assert fresh.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    assert torch.allclose(_logits(fresh, x), _logits(model, x), atol=1e-3)


def test_lora_for_another_base_shape_is_refused(tiny, tmp_path):
    _, model, _ = _base_and_lora(tiny(), rank=4)
    path = save_lora(model, tmp_path / "lora_64.pth")
    wider = MiniMindForCausalLM(tiny(hidden_size=96))
    with pytest.raises(ValueError) as err:
        load_lora(wider, path)
    message = str(err.value)
    assert "model.layers.0.self_attn.q_proj.lora_A: file has (4, 64), model needs (4, 96)" in message
    assert "hidden_size 64" in message
    assert not any(isinstance(m, LoRALinear) for m in wider.modules()), "a refused file must leave the model as it was"

    shallower = MiniMindForCausalLM(tiny(num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"lacks.*model\.layers\.1\."):
        load_lora(shallower, path)
    deeper = MiniMindForCausalLM(tiny(num_hidden_layers=3))  # every layer the file names exists here too
    with pytest.raises(ValueError, match="the file adapts a 2-layer model; this one has 3 layers"):
        load_lora(deeper, path)


def test_loading_into_existing_lora_layers_takes_the_files_alpha(tiny, tmp_path):
    base, model, _ = _base_and_lora(tiny(), rank=4, alpha=8)
    _randomize_lora(model)
    path = save_lora(model, tmp_path / "lora_64.pth")
    apply_lora(base, rank=4, alpha=4)
    load_lora(base, path)
    x = _tokens()
    torch.testing.assert_close(_logits(base, x), _logits(model, x))


def test_square_targets_and_defaults(tiny):
    config = tiny()  # GQA: q/o are 64x64, k/v 32x64, MLP 128x64
    square = {n for n, m in MiniMindForCausalLM(config).named_modules()
              if isinstance(m, nn.Linear) and m.weight.shape[0] == m.weight.shape[1]}
    _, _, names = _base_and_lora(config, rank=2, targets="square")
    assert set(names) == square
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "o_proj"}  # MiniMind's "q/o only"

    _, _, names = _base_and_lora(config, rank=2)
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"}
    assert len(names) == 7 * config.num_hidden_layers

    _, _, names = _base_and_lora(config, rank=2, targets=[r"model\.layers\.1\.mlp\..*"])
    assert names == [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")]


def test_dropout_only_on_the_lora_path_in_training(tiny):
    base, model, _ = _base_and_lora(tiny(), rank=4, dropout=0.5)
    x = _tokens()
    model.train()
    assert torch.equal(_logits(model, x), _logits(base, x))  # B = 0: dropout never touches the base path
    _randomize_lora(model)
    assert not torch.equal(_logits(model, x), _logits(model, x))
    model.eval()
    assert torch.equal(_logits(model, x), _logits(model, x))


def test_apply_lora_refuses_bad_requests(tiny):
    model = MiniMindForCausalLM(tiny())
    with pytest.raises(ValueError, match="no Linear layer matches"):
        apply_lora(model, targets=["qkv"])
    with pytest.raises(ValueError, match="tied"):
        apply_lora(model, targets=["lm_head"])
    apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=2)


def _peft_twin(base: nn.Module, model: nn.Module, names: list[str], targets: list[str], **config) -> nn.Module:
    """peft's LoRA (DoRA with use_dora=True) on ``base``, holding ``model``'s A, B (and magnitude) tensors."""
    from peft import LoraConfig, get_peft_model

    config = {"lora_dropout": 0.0, **config}
    reference = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                **config)).eval()
    inner = reference.base_model.model
    assert sorted(names) == sorted(n for n, m in inner.named_modules() if hasattr(m, "lora_A") and n)
    with torch.no_grad():
        for name in names:
            ours, theirs = model.get_submodule(name), inner.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(ours.lora_A)
            theirs.lora_B["default"].weight.copy_(ours.lora_B)
            if isinstance(ours, DoRALinear):
                theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude)
    return reference


def test_matches_peft(tiny):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base, model, names = _base_and_lora(tiny(), rank=4, alpha=8, targets=targets)
    _randomize_lora(model)
    reference = _peft_twin(base, model, names, targets)
    x = _tokens()
    assert torch.allclose(_logits(model, x), _logits(reference, x), atol=1e-5)


def test_moe_experts_wrapped_router_not(tiny):
    base, model, names = _base_and_lora(tiny(**MOE), rank=4)
    assert any(".mlp.experts.3.down_proj" in n for n in names)
    assert any(".mlp.shared_experts.0.gate_proj" in n for n in names)
    assert not any(n.endswith("mlp.gate") for n in names)
    assert not model.model.layers[0].mlp.gate.weight.requires_grad
    x = _tokens()
    assert torch.equal(_logits(model, x), _logits(base, x))

    model.train()
    model(x, labels=x).loss.backward()
    assert all((p.grad is not None) == (".lora_" in name) for name, p in model.named_parameters())

    model.eval()
    _randomize_lora(model, std=0.02)
    with_lora = _logits(model, x)
    merged = merge_lora(model)
    assert list(merged.state_dict()) == list(base.state_dict())
    assert torch.allclose(_logits(merged, x), with_lora, atol=1e-5)


def test_loads_minimind_lora_files(tiny, tmp_path):
    """MiniMind saves ``<layer>.lora.A.weight`` / ``.lora.B.weight`` for square layers and adds B·A unscaled."""
    base = MiniMindForCausalLM(tiny()).eval()
    square = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and m.weight.shape[0] == m.weight.shape[1]]
    state = {}
    for name in square:
        state[f"{name}.lora.A.weight"] = (torch.randn(8, 64) * 0.05).half()  # MiniMind saves them in fp16
        state[f"{name}.lora.B.weight"] = (torch.randn(64, 8) * 0.05).half()
    torch.save(state, tmp_path / "lora_identity_64.pth")

    model = copy.deepcopy(base)
    assert load_lora(model, tmp_path / "lora_identity_64.pth") == square
    layer = model.get_submodule(square[0])
    assert layer.rank == 8 and layer.scale == 1.0
    assert torch.equal(layer.lora_B, state[f"{square[0]}.lora.B.weight"].float())

    x = torch.randn(3, 64)  # the layer computes W x + B A x, as MiniMind's does
    expected = x @ base.get_submodule(square[0]).weight.T + x @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_state_dict_strips_ddp_and_compile_prefixes(tiny):
    model = MiniMindForCausalLM(tiny())
    apply_lora(model, rank=2)
    keys = list(lora_state_dict(model))

    class FakeDDP(nn.Module):  # DistributedDataParallel keeps the model as `.module`
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

    assert list(lora_state_dict(FakeDDP(model))) == keys
    assert list(lora_state_dict(torch.compile(model))) == keys  # compiling is lazy: nothing is traced here
    assert keys and all(k.startswith("model.layers.") for k in keys)


def test_counts_summary_and_paths(tiny):
    model = MiniMindForCausalLM(tiny())
    total_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, rank=4, targets="square")
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora == tiny().num_hidden_layers * 2 * (4 * 64 + 64 * 4)  # q and o: A [4, 64] + B [64, 4]
    assert lora_parameter_count(model) == (lora, total_before + lora)
    assert re.fullmatch(r"LoRA: \d+\.\d\dM trainable / \d+\.\d\dM total \(\d+\.\d\d%\)", lora_summary(model))

    assert lora_path("identity", MiniMindConfig()) == REPO_ROOT / "out" / "lora" / "lora_identity_512.pth"
    assert lora_path("medical", MiniMindConfig.from_preset("minimind2-moe"), "runs").name == "lora_medical_640_moe.pth"
    assert lora_path("x", MiniMindConfig(), "runs").parent == REPO_ROOT / "runs" / "lora"


def test_an_older_file_without_a_layer_count_still_loads(tiny, tmp_path):
    """Files saved before num_hidden_layers was recorded: adapting layer 0 only says nothing about the base depth."""
    _, model, _ = _base_and_lora(tiny(), rank=2, targets=["model.layers.0.self_attn.q_proj"])
    path = save_lora(model, tmp_path / "old.pth")
    data = torch.load(path, weights_only=True)
    del data["lora_config"]["num_hidden_layers"]
    torch.save(data, path)
    assert load_lora(MiniMindForCausalLM(tiny()), path) == ["model.layers.0.self_attn.q_proj"]


# ----------------------------------------------------------------------------------------------------------------------
# DoRA


def _randomize_dora(model: nn.Module) -> None:
    """A and B as in _randomize_lora, and a magnitude that is no longer the weight's norm."""
    _randomize_lora(model)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, DoRALinear):
                layer.lora_magnitude.mul_(1 + 0.2 * torch.randn_like(layer.lora_magnitude))


def test_dora_init_equals_base_exactly(tiny):
    base, model, names = _base_and_lora(tiny(), rank=4, lora_type="dora")
    assert all(isinstance(model.get_submodule(n), DoRALinear) for n in names)
    x = _tokens()
    assert torch.equal(_logits(model, x), _logits(base, x))  # m = ‖W‖ and B = 0: exactly the base model
    assert set(model.state_dict()) - set(base.state_dict()) == {f"{n}.lora_{m}" for n in names
                                                                for m in ("A", "B", "magnitude")}
    layer = model.model.layers[0].mlp.down_proj
    torch.testing.assert_close(layer.lora_magnitude, layer.weight.norm(dim=1), rtol=0, atol=0)


def test_dora_matches_peft(tiny):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base, model, names = _base_and_lora(tiny(), rank=4, alpha=8, targets=targets, lora_type="dora")
    _randomize_dora(model)
    x = _tokens()
    plain_lora = copy.deepcopy(model)  # the same A and B without the magnitude: DoRA must differ from it
    for name in names:
        layer = plain_lora.get_submodule(name)
        layer.__class__ = LoRALinear
        del layer.lora_magnitude
    assert not torch.allclose(_logits(model, x), _logits(plain_lora, x), atol=1e-3)
    reference = _peft_twin(base, model, names, targets, use_dora=True)
    torch.testing.assert_close(_logits(model, x), _logits(reference, x), rtol=0, atol=1e-5)

    # The same gradients too: the norm is a constant to backprop in both (a norm that is not detached changes them).
    model(x, labels=x).loss.backward()
    reference(input_ids=x, labels=x).loss.backward()
    inner = reference.base_model.model
    for name in names:
        ours, theirs = model.get_submodule(name), inner.get_submodule(name)
        pairs = [(ours.lora_A, theirs.lora_A["default"].weight), (ours.lora_B, theirs.lora_B["default"].weight),
                 (ours.lora_magnitude, theirs.lora_magnitude_vector["default"].weight)]
        for mine, peft_param in pairs:
            torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-4, atol=1e-6)


def test_dora_matches_peft_under_dropout(tiny):
    """In training with dropout, peft rescales the base output of the dropped-out input: the same masks (one draw per
    layer, in the same order) give the same logits."""
    targets = ["q_proj", "v_proj", "down_proj"]
    base, model, names = _base_and_lora(tiny(), rank=4, alpha=8, targets=targets, lora_type="dora", dropout=0.3)
    _randomize_dora(model)
    reference = _peft_twin(base, model, names, targets, use_dora=True, lora_dropout=0.3)
    x = _tokens()
    model.train(), reference.train()
    torch.manual_seed(1)
    ours = _logits(model, x)
    torch.manual_seed(1)
    torch.testing.assert_close(ours, _logits(reference, x), rtol=0, atol=1e-5)
    assert not torch.allclose(ours, _logits(model.eval(), x), atol=1e-3)  # dropout did act


def test_dora_merge_equals_the_unmerged_model(tiny, tmp_path):
    base, model, _ = _base_and_lora(tiny(**MOE), rank=4, alpha=8, lora_type="dora")
    _randomize_dora(model)
    x = _tokens()
    unmerged = _logits(model, x)
    merged = merge_lora(model)
    assert list(merged.state_dict()) == list(base.state_dict())
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, x), unmerged, rtol=0, atol=1e-5)


def test_dora_training_moves_a_b_and_m_never_the_base(tiny):
    base, model, _ = _base_and_lora(tiny(), rank=4, lora_type="dora", dropout=0.1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora_(A|B|magnitude)$", name) for name in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = _train_a_few_steps(model)
    for key in base.state_dict():
        assert torch.equal(after[key], before[key]), f"base weight {key} changed"
    adapter = [k for k in after if ".lora_" in k]
    assert all(not torch.equal(after[k], before[k]) for k in adapter), "A, B and m should all have moved"


def test_dora_saves_its_type_and_loads_without_flags(tiny, tmp_path):
    base, model, names = _base_and_lora(tiny(), rank=4, alpha=8, lora_type="dora")
    _randomize_dora(model)
    path = save_lora(model, tmp_path / "lora_dora_64.pth")
    config, weights = read_lora_file(path)
    assert config["lora_type"] == "dora" and f"{names[0]}.lora_magnitude" in weights
    assert lora_summary(model).startswith("DoRA: ")

    fresh = copy.deepcopy(base)
    assert load_lora(fresh, path) == names
    assert isinstance(fresh.get_submodule(names[0]), DoRALinear)
    x = _tokens()
    assert torch.equal(_logits(fresh, x), _logits(model, x))

    with_lora = copy.deepcopy(base)  # a DoRA file does not go into plain LoRA layers, nor the other way round
    apply_lora(with_lora, rank=4)
    with pytest.raises(ValueError, match=f"{re.escape(names[0])}: the model's layer is lora, the file is dora"):
        load_lora(with_lora, path)
    lora_file = save_lora(with_lora, tmp_path / "lora_64.pth")
    with pytest.raises(ValueError, match="the model's layer is dora, the file is lora"):
        load_lora(fresh, lora_file)
    assert read_lora_file(lora_file)[0]["lora_type"] == "lora"
