"""The model against its references: HF Llama/Qwen3, a cache-free forward, a per-token MoE loop, hand-worked values."""

import json
import math

import pytest
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3MoeConfig, Qwen3MoeForCausalLM)
from transformers.cache_utils import DynamicCache, StaticCache

from model import MiniMindConfig, MiniMindForCausalLM
from model.checkpoint_config import config_for_state_dict, shape_of_state_dict
from model.hf_interop import read_transformers_folder, save_transformers
from model.loading import load_tokenizer
from model.model_minimind import SHAPE_FIELDS, rope_inv_freq
from model.weights import load_state_dict_into, load_weights, read_state_dict, save_weights
from tests.conftest import TINY


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Random norm weights too, so a swapped or missing norm cannot hide behind all-ones."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def hf_reference(config: MiniMindConfig) -> torch.nn.Module:
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, attn_implementation="eager",
    )
    if config.qk_norm:
        return Qwen3ForCausalLM(Qwen3Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_matches_hf_reference(tiny, qk_norm):
    config = tiny(qk_norm=qk_norm, head_dim=24 if qk_norm else None)
    ours = randomized(MiniMindForCausalLM(config))
    ref = hf_reference(config)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, config.vocab_size, (2, 37))
    labels = ids.clone()
    labels[:, :5] = -100
    out, expected = ours(ids, labels=labels), ref(ids, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-6, rtol=1e-6)


def test_plain_attention_matches_fused(tiny):
    fused = randomized(MiniMindForCausalLM(tiny()))
    plain = MiniMindForCausalLM(tiny(flash_attn=False)).eval()
    plain.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 6400, (2, 20))
    torch.testing.assert_close(plain(ids).logits, fused(ids).logits, atol=1e-5, rtol=1e-5)


def test_inference_on_cuda_avoids_cudnn_attention_and_training_keeps_it(tiny, monkeypatch):
    """cuDNN attention builds a plan per new sequence length, i.e. per generated token: inference on CUDA turns it
    off for the SDPA call (read off torch's backend flags, which exist without a GPU); training keeps the default."""
    from model import model_minimind

    for on_cuda, training, cudnn in [(True, False, False), (True, True, True), (False, False, True)]:
        with model_minimind.attention_backends(on_cuda, training):
            assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn
        assert torch.backends.cuda.cudnn_sdp_enabled()  # restored afterwards

    calls = []
    real = model_minimind.attention_backends
    monkeypatch.setattr(model_minimind, "attention_backends", lambda *a: calls.append(a) or real(*a))
    model = MiniMindForCausalLM(tiny())
    ids = torch.randint(0, 6400, (1, 8))
    model.eval()(ids)
    model.train()(ids)
    assert calls == [(False, False)] * 2 + [(False, True)] * 2  # every layer (2) asks, with its mode


@pytest.mark.parametrize("use_moe,cache_kind", [(False, "dynamic"), (True, "dynamic"), (False, "static")])
def test_kv_cache_decoding_equals_full_forward(tiny, use_moe, cache_kind):
    model = randomized(MiniMindForCausalLM(tiny(use_moe=use_moe, qk_norm=True)))
    ids = torch.randint(0, 6400, (2, 24))
    full = model(ids).logits
    cache = DynamicCache(config=model.config) if cache_kind == "dynamic" else \
        StaticCache(config=model.config, max_cache_len=32)  # preallocated: later slots must stay masked
    steps = [model(ids[:, :16], past_key_values=cache, use_cache=True).logits]
    steps.append(model(ids[:, 16:19], past_key_values=cache, use_cache=True).logits)  # a multi-token chunk
    for t in range(19, 24):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def greedy_without_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_equals_plain_argmax_loop(tiny, cache):
    model = randomized(MiniMindForCausalLM(tiny()))
    prompt = torch.randint(3, 6400, (1, 7))
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)
    assert torch.equal(out, greedy_without_cache(model, prompt, 12))


def test_left_padded_batch_equals_single_sequences(tiny):
    model = randomized(MiniMindForCausalLM(tiny()))
    a, b = torch.randint(3, 6400, (1, 9)), torch.randint(3, 6400, (1, 5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    last = model(batch, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(last[0], model(a).logits[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last[1], model(b).logits[0, -1], atol=1e-5, rtol=1e-5)
    # and batched greedy generation produces, row by row, what each prompt produces alone
    gen = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(gen[0, 9:], greedy_without_cache(model, a, 6)[0, 9:])
    assert torch.equal(gen[1, 9:], greedy_without_cache(model, b, 6)[0, 5:])


def moe_per_token_reference(moe, x: torch.Tensor) -> torch.Tensor:
    """Each token through its top-k experts one at a time: slow, obviously right."""
    flat = x.reshape(-1, x.shape[-1])
    _, experts, weights = moe.route(x)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(moe.top_k):
            out[t] += weights[t, slot] * moe.experts[int(experts[t, slot])](flat[t])
        for shared in moe.shared_experts:
            out[t] += shared(flat[t])
    return out.view_as(x)


@pytest.mark.parametrize("top_k,shared", [(2, 1), (1, 0)], ids=["minimind2-moe", "minimind3-moe"])
def test_moe_dispatch_equals_per_token_loop(tiny, top_k, shared):
    model = MiniMindForCausalLM(tiny(use_moe=True, n_routed_experts=4, num_experts_per_tok=top_k, n_shared_experts=shared))
    moe = model.model.layers[0].mlp
    x = torch.randn(3, 11, 64)
    y, _ = moe(x)
    torch.testing.assert_close(y, moe_per_token_reference(moe, x), atol=1e-5, rtol=1e-5)


def test_moe_aux_loss_hand_worked(tiny):
    """2 tokens, 2 experts, top-1, α = 1: tokens route 0.8/0.2 -> e0 and 0.3/0.7 -> e1.
    counts (1, 1), load = count / (T·k / E) = (1, 1); mean probs (0.55, 0.45); aux = 1·0.55 + 1·0.45 = 1.0.
    Unbalanced: both to e0 with probs 0.8/0.2 and 0.6/0.4: load (2, 0), mean probs (0.7, 0.3) -> aux 1.4."""
    moe = MiniMindForCausalLM(tiny(use_moe=True, n_routed_experts=2, num_experts_per_tok=1, aux_loss_alpha=1.0)).model.layers[0].mlp
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    assert moe.aux_loss(probs, probs.argmax(-1, keepdim=True), batch=1).item() == pytest.approx(1.0)
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    assert moe.aux_loss(probs, probs.argmax(-1, keepdim=True), batch=1).item() == pytest.approx(1.4)


def tiny_preset(name: str, **overrides) -> MiniMindConfig:
    """A named preset's conventions (MoE routing, balancing loss, q/k-norm) at the tiny test size."""
    return MiniMindConfig.from_preset(name, **{**TINY, "head_dim": None, **overrides})


def router_with_probs(config: MiniMindConfig, probs: list[float]) -> tuple[torch.nn.Module, torch.Tensor]:
    """A MoE layer whose router gives exactly ``probs`` for the returned one-token input: logit_e = ln(p_e)."""
    moe = MiniMindForCausalLM(config).model.layers[0].mlp
    x = torch.zeros(1, 1, config.hidden_size)
    x[..., 0] = 1.0
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, 0] = torch.tensor(probs).log()
    return moe, x


@pytest.mark.parametrize("preset,top1_weight", [("minimind2-moe", 0.8), ("minimind3-moe", 1.0)])
def test_router_weights_hand_worked(preset, top1_weight):
    """Router probabilities (0.8, 0.2), top-1: MiniMind2 weights the chosen expert by its probability, 0.8;
    minimind-3 (and Qwen3-MoE) renormalise the top-k weights for k = 1 too, so it gets 1.0. Top-2 of (0.5, 0.3, 0.2)
    renormalise the same way in both: 0.5 / 0.8 = 0.625 and 0.3 / 0.8 = 0.375."""
    moe, x = router_with_probs(tiny_preset(preset, n_routed_experts=2, num_experts_per_tok=1), [0.8, 0.2])
    probs, experts, weights = moe.route(x)
    torch.testing.assert_close(probs, torch.tensor([[0.8, 0.2]]))
    assert experts.tolist() == [[0]] and weights.item() == pytest.approx(top1_weight)
    moe, x = router_with_probs(tiny_preset(preset, n_routed_experts=3, num_experts_per_tok=2), [0.5, 0.3, 0.2])
    _, experts, weights = moe.route(x)
    assert dict(zip(experts[0].tolist(), weights[0].tolist())) == pytest.approx({0: 0.625, 1: 0.375})


@pytest.mark.parametrize("form,two_sequences,top2", [("sequence", 1.5, 1.2), ("batch", 1.0, 2.4)])
def test_moe_aux_loss_forms_hand_worked(tiny, form, two_sequences, top2):
    """α = 1. Two sequences of one token, E = 2, top-1: (0.8, 0.2) -> e0 and (0.3, 0.7) -> e1.
      sequence (MiniMind2): per sequence load = count / (T·k / E) = (2, 0) and (0, 2): 2·0.8 = 1.6 and 2·0.7 = 1.4,
                            mean 1.5;
      batch (minimind-3):   E · Σ_e (count_e / N) · P_e over the batch = 2 · (0.5·0.55 + 0.5·0.45) = 1.0.
    One token, E = 3, top-2, (0.5, 0.3, 0.2) -> e0, e1:
      sequence: load = 1 / (2/3) = 1.5 for e0 and e1: 1.5·0.5 + 1.5·0.3 = 1.2;
      batch:    3 · (1·0.5 + 1·0.3) = 2.4 (minimind-3 counts tokens, not slots: uniform routing gives k·α)."""
    moe = MiniMindForCausalLM(tiny(use_moe=True, n_routed_experts=2, num_experts_per_tok=1, aux_loss_alpha=1.0,
                                   aux_loss_form=form)).model.layers[0].mlp
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
    assert moe.aux_loss(probs, probs.argmax(-1, keepdim=True), batch=2).item() == pytest.approx(two_sequences)
    moe = MiniMindForCausalLM(tiny(use_moe=True, n_routed_experts=3, num_experts_per_tok=2, aux_loss_alpha=1.0,
                                   aux_loss_form=form)).model.layers[0].mlp
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    assert moe.aux_loss(probs, torch.tensor([[0, 1]]), batch=1).item() == pytest.approx(top2)


def qwen3_moe_reference(model: MiniMindForCausalLM) -> torch.nn.Module:
    """transformers' Qwen3-MoE (minimind-3-moe's layout, no shared expert) with ``model``'s weights; its experts are
    stacked: gate_up_proj [E, 2·I, H] (gate rows first), down_proj [E, H, I]."""
    c = model.config
    ref = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, num_experts=c.n_routed_experts,
        num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.intermediate_size,
        norm_topk_prob=c.norm_topk_prob, attn_implementation="eager"))
    state = dict(model.state_dict())
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.experts"
        weights = [{name: state.pop(f"{prefix}.{e}.{name}_proj.weight") for name in ("gate", "up", "down")}
                   for e in range(c.n_routed_experts)]
        state[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([w["gate"], w["up"]]) for w in weights])
        state[f"{prefix}.down_proj"] = torch.stack([w["down"] for w in weights])
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def test_minimind3_moe_matches_qwen3_moe_reference():
    """minimind-3-moe routes each token to one expert with weight 1.0, as Qwen3-MoE computes it."""
    model = randomized(MiniMindForCausalLM(tiny_preset("minimind3-moe")))
    with torch.no_grad():  # a router far from uniform, so a weight of p instead of 1.0 shows
        model.model.layers[0].mlp.gate.weight.normal_(0, 1)
    ids = torch.randint(0, 6400, (2, 17))
    torch.testing.assert_close(model(ids).logits, qwen3_moe_reference(model)(ids).logits, atol=1e-5, rtol=1e-5)


def test_minimind3_moe_aux_loss_is_its_batch_formula():
    """In training, the preset's loss adds, per MoE layer, minimind-3's E · coef · Σ_e (share of tokens routed to e)
    · (mean router probability of e) over all B·T tokens."""
    model = MiniMindForCausalLM(tiny_preset("minimind3-moe")).train()
    inputs = []
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda module, args: inputs.append((module, args[0])))
    ids = torch.randint(0, 6400, (3, 16))
    out = model(ids, labels=ids)
    expected = 0.0
    for moe, x in inputs:
        probs, experts, _ = moe.route(x)
        share = torch.nn.functional.one_hot(experts[:, 0], moe.n_experts).float().mean(0)
        expected += moe.n_experts * 5e-4 * (share * probs.mean(0)).sum()
    torch.testing.assert_close(out.aux_loss, expected)


# A config.json as minimind-3's own code writes it (its MiniMindConfig attributes; Qwen3-MoE's names for MoE).
MINIMIND3_MOE_CONFIG = {
    "architectures": ["MiniMindForCausalLM"], "model_type": "minimind", "hidden_size": 768, "num_hidden_layers": 8,
    "use_moe": True, "dropout": 0.0, "vocab_size": 6400, "bos_token_id": 1, "eos_token_id": 2, "flash_attn": True,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 96, "hidden_act": "silu",
    "intermediate_size": 2432, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "inference_rope_scaling": False, "rope_scaling": None, "num_experts": 4,
    "num_experts_per_tok": 1, "moe_intermediate_size": 2432, "norm_topk_prob": True, "router_aux_loss_coef": 0.0005,
    "dtype": "float16",
}
CONVENTIONS = ("norm_topk_prob", "norm_top1_prob", "aux_loss_alpha", "aux_loss_form")


def test_minimind3_config_json_reads_as_the_minimind3_moe_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MINIMIND3_MOE_CONFIG))
    config = MiniMindConfig.from_json_file(str(path))
    preset = MiniMindConfig.from_preset("minimind3-moe")
    for field in (*SHAPE_FIELDS, *CONVENTIONS, "rms_norm_eps", "rope_theta", "rope_scaling"):
        assert getattr(config, field) == getattr(preset, field), field
    assert not hasattr(config, "num_experts") and not hasattr(config, "router_aux_loss_coef")  # read, not kept
    with pytest.raises(ValueError, match="moe_intermediate_size=1024"):
        MiniMindConfig(**{**MINIMIND3_MOE_CONFIG, "moe_intermediate_size": 1024})


@pytest.mark.parametrize("seq_aux,form", [(True, "sequence"), (False, "batch")])
def test_minimind2_seq_aux_reads_as_aux_loss_form(seq_aux, form):
    config = MiniMindConfig(use_moe=True, seq_aux=seq_aux, aux_loss_alpha=0.01)
    assert config.aux_loss_form == form and not config.norm_top1_prob and not hasattr(config, "seq_aux")
    with pytest.raises(ValueError, match="aux_loss_form='token'"):
        MiniMindConfig(aux_loss_form="token")


@pytest.mark.parametrize("preset", ["minimind2-moe", "minimind3-moe"])
def test_moe_conventions_survive_save_and_transformers_export(preset, tmp_path):
    """The routing and balancing-loss fields travel in the .json beside a .pth and in an exported folder."""
    model = randomized(MiniMindForCausalLM(tiny_preset(preset)))
    expected = {field: getattr(model.config, field) for field in CONVENTIONS}
    path = save_weights(model, tmp_path / "pretrain_64_moe.pth")
    config = config_for_state_dict(read_state_dict(path), path)
    assert {field: getattr(config, field) for field in CONVENTIONS} == expected
    config, state = read_transformers_folder(save_transformers(model, load_tokenizer(), tmp_path / "hf"))
    assert {field: getattr(config, field) for field in CONVENTIONS} == expected
    loaded = load_state_dict_into(MiniMindForCausalLM(config), state, "folder")
    ids = torch.randint(0, 6400, (2, 9))
    torch.testing.assert_close(loaded.eval()(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_moe_gradients_reach_router_and_every_expert(tiny):
    model = MiniMindForCausalLM(tiny(use_moe=True, aux_loss_alpha=0.01)).train()
    ids = torch.randint(0, 6400, (4, 32))
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, 6400), ids[:, 1:].reshape(-1)) + out.aux_loss)
    out.loss.backward()
    for layer in model.model.layers:
        assert layer.mlp.gate.weight.grad.abs().sum() > 0
        for expert in [*layer.mlp.experts, *layer.mlp.shared_experts]:
            assert expert.up_proj.weight.grad.abs().sum() > 0


def test_save_pretrained_roundtrip_with_automodel(tiny, tmp_path):
    model = randomized(MiniMindForCausalLM(tiny(use_moe=True)))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MiniMindForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, 6400, (2, 13))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_minimind_half_precision_pth_loads_strictly(tiny, tmp_path):
    model = randomized(MiniMindForCausalLM(tiny()))
    path = save_weights(model, tmp_path / "full_sft_64.pth")
    state = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values())
    assert "model.layers.1.self_attn.q_proj.weight" in state and "lm_head.weight" in state
    fresh = load_weights(MiniMindForCausalLM(tiny()), path)
    ids = torch.randint(0, 6400, (1, 9))
    torch.testing.assert_close(fresh.eval()(ids).logits, model(ids).logits, atol=5e-2, rtol=5e-2)
    assert shape_of_state_dict(state)["hidden_size"] == 64


def test_wrong_shape_checkpoint_names_parameter_and_needed_config(tiny, tmp_path):
    path = save_weights(MiniMindForCausalLM(tiny(hidden_size=96, num_attention_heads=4)), tmp_path / "pretrain_96.pth")
    with pytest.raises(ValueError) as err:
        load_weights(MiniMindForCausalLM(tiny()), path)
    message = str(err.value)
    assert "model.embed_tokens.weight: file has (6400, 96), model has (6400, 64)" in message
    assert "--hidden_size 96 --num_hidden_layers 2 --use_moe 0" in message


def test_missing_checkpoint_names_path(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing.pth"):
        load_weights(MiniMindForCausalLM(tiny()), tmp_path / "nothing.pth")


def test_yarn_factor_one_is_plain_rope_and_scaling_follows_formula(tiny):
    plain, _ = rope_inv_freq(tiny())
    same, attn = rope_inv_freq(tiny(rope_scaling={"type": "yarn", "factor": 1.0, "original_max_position_embeddings": 64}))
    torch.testing.assert_close(same, plain)
    assert attn == 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1}
    ours, attn = rope_inv_freq(tiny(rope_scaling={**scaling}))
    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
                            rope_parameters={**scaling, "rope_theta": 1e6})
    expected, expected_attn = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    torch.testing.assert_close(ours, expected)
    assert attn == pytest.approx(expected_attn) == pytest.approx(0.1 * math.log(16) + 1)
    assert ours[0] == plain[0] and ours[-1] == pytest.approx(plain[-1] / 16)  # fast dims kept, slow ones divided


def test_presets_have_the_published_sizes():
    sizes = {}
    for name in ["minimind2-small", "minimind2", "minimind2-moe", "minimind3", "minimind3-moe"]:
        with torch.device("meta"):
            sizes[name] = MiniMindForCausalLM(MiniMindConfig.from_preset(name)).count_parameters()
    assert round(sizes["minimind2-small"][0] / 1e6) == 26
    assert round(sizes["minimind2"][0] / 1e6) == 104
    assert round(sizes["minimind2-moe"][0] / 1e6) == 145
    assert round(sizes["minimind3"][0] / 1e6) == 64
    assert [round(n / 1e6) for n in sizes["minimind3-moe"]] == [198, 64]
    with pytest.raises(ValueError, match="unknown preset"):
        MiniMindConfig.from_preset("gpt5")


def test_loss_is_zero_not_nan_when_nothing_is_supervised(tiny):
    model = MiniMindForCausalLM(tiny())
    ids = torch.randint(0, 6400, (2, 8))
    assert model(ids, labels=torch.full_like(ids, -100)).loss.item() == 0.0


def test_packed_row_with_restarting_positions_keeps_documents_apart(tiny):
    """Two documents in one row, positions restarting at the second: each part equals its document alone."""
    model = randomized(MiniMindForCausalLM(tiny()))
    a, b = torch.randint(3, 6400, (1, 7)), torch.randint(3, 6400, (1, 5))
    row = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)]).unsqueeze(0)
    packed = model(row, position_ids=positions).logits
    torch.testing.assert_close(packed[:, :7], model(a).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 7:], model(b).logits, atol=1e-5, rtol=1e-5)
    crossing = model(row).logits  # without the positions, b attends to a: different logits
    assert not torch.allclose(crossing[:, 7:], packed[:, 7:], atol=1e-3)
