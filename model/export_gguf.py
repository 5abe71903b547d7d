"""Write a dense model as one GGUF file that stock llama.cpp / Ollama run, without patching llama.cpp.

llama.cpp's own converter (convert_hf_to_gguf.py) refuses every BPE vocabulary it has not seen before: it recognises
pre-tokenizers by a hash of a probe text. So we write the file ourselves with `gguf`, ggml's own Python writer:
- architecture `llama` (`qwen3` for the q/k-norm layout), hyper-parameters under llama.cpp's keys;
- our byte-level BPE declared as GPT-2's (`tokenizer.ggml.pre = "gpt-2"`: the same split regex), with its merges,
  special tokens as CONTROL, the tool/think tokens as USER_DEFINED, and the chat template;
- tensors under llama.cpp's names. Its `llama` graph applies RoPE to interleaved pairs while ours (as transformers')
  rotates the two halves of each head, so q_proj/k_proj rows are permuted as llama.cpp's converter does; `qwen3` uses
  the half-split (NEOX) order and needs no permutation. A tied LM head is not stored: llama.cpp reuses the
  embedding when `output.weight` is absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from model.model_minimind import MiniMindForCausalLM

# our parameter name inside a layer -> llama.cpp's
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}

# GGUFWriter.add_<key> -> our config field (written under "<architecture>.<llama.cpp's name>")
HYPERPARAMETERS = {
    "context_length": "max_position_embeddings", "embedding_length": "hidden_size", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "head_count": "num_attention_heads",
    "head_count_kv": "num_key_value_heads", "key_length": "head_dim", "value_length": "head_dim",
    "rope_dimension_count": "head_dim", "rope_freq_base": "rope_theta", "layer_norm_rms_eps": "rms_norm_eps",
    "vocab_size": "vocab_size",
}


def interleave_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's output rows from half-split RoPE order (x0..x(d/2-1), x(d/2)..) to interleaved pairs
    (x0, x(d/2), x1, ...), the order llama.cpp's `llama` graph rotates (its converter's `permute`)."""
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: MiniMindForCausalLM, dtype: np.dtype) -> dict[str, np.ndarray]:
    """llama.cpp name -> array. Matrices in `dtype`; norm vectors stay float32, as llama.cpp's converter keeps them."""
    config, arch = model.config, gguf_architecture(model)
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        array = tensor.detach().float().cpu().numpy()
        if name == "model.embed_tokens.weight":
            key = "token_embd.weight"
        elif name == "lm_head.weight":
            key = "output.weight"
        elif name == "model.norm.weight":
            key = "output_norm.weight"
        else:
            _, _, layer, rest = name.split(".", 3)  # model.layers.<i>.<module>.weight
            module = rest.removesuffix(".weight")
            key = f"blk.{layer}.{LAYER_TENSORS[module]}.weight"
            if arch == "llama" and module == "self_attn.q_proj":
                array = interleave_rope_rows(array, config.num_attention_heads)
            elif arch == "llama" and module == "self_attn.k_proj":
                array = interleave_rope_rows(array, config.num_key_value_heads)
        out[key] = array.astype(dtype if array.ndim > 1 else np.float32)
    return out


def gguf_architecture(model: MiniMindForCausalLM) -> str:
    config = model.config
    if config.use_moe:
        raise ValueError("GGUF export covers dense models; an MoE model exports as a transformers folder only")
    if config.rope_scaling:
        raise ValueError("GGUF export of a YaRN (rope_scaling) model is not supported yet: export it without "
                         "rope_scaling, and pass llama.cpp's --rope-scaling yarn flags at run time")
    return "qwen3" if config.qk_norm else "llama"


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """The vocabulary as llama.cpp's GPT-2-style BPE: tokens by id, their types, the merges and special ids."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    gpt2_like = (spec["model"]["type"] == "BPE" and not spec.get("normalizer") and pre.get("type") == "ByteLevel"
                 and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))
    if not gpt2_like:
        raise ValueError("GGUF export declares the tokenizer as GPT-2's: it must be a byte-level BPE with GPT-2's split "
                         "regex, no prefix space and no normalizer (as model/tokenizer.json is)")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise ValueError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings")
    added = {t["id"]: t for t in spec["added_tokens"]}
    tokens, types = [], []
    for i in range(vocab_size):  # ids past the tokenizer (a model with a larger embedding) become unused slots
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))  # a chat reply ends here
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)  # prompts carry their own <|im_start|>; nothing is prepended
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def save_gguf(model: MiniMindForCausalLM, tokenizer, path: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write ``model`` and ``tokenizer`` to the GGUF file ``path`` ("f16" or "f32" weights); returns the path.
    The file is written next to its final name and renamed into place, so a crash leaves no half file."""
    arch, config, path = gguf_architecture(model), model.config, Path(path)
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype must be 'f16' or 'f32', got {dtype!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name("minimind")
        for key, field in HYPERPARAMETERS.items():
            getattr(writer, f"add_{key}")(getattr(config, field))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        add_tokenizer(writer, tokenizer, config.vocab_size)
        with torch.no_grad():
            for name, array in gguf_tensors(model, np.float16 if dtype == "f16" else np.float32).items():
                writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
