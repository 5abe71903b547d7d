"""The model against its references: HF Llama/Qwen3, a cache-free forward, a per-token MoE loop, hand-worked values."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

from model import MiniMindConfig, MiniMindForCausalLM
from model.checkpoint_config import shape_of_state_dict
from model.weights import load_weights, save_weights
from model.model_minimind import rope_inv_freq


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
