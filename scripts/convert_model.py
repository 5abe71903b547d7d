"""Convert between our checkpoints and transformers folders.  模型格式转换（.pth <-> transformers）。

    # ours -> transformers: dense -> LlamaForCausalLM, q/k-norm -> Qwen3ForCausalLM (no trust_remote_code needed)
    python scripts/convert_model.py --weight full_sft --hidden_size 512             # -> out/full_sft_512-hf/
    python scripts/convert_model.py --weight full_sft --merge_lora identity --output out/minimind-identity
    # transformers -> ours (a Llama / Qwen3 / minimind folder of a MiniMind shape)
    python scripts/convert_model.py --load_from out/full_sft_512-hf --save_weight full_sft   # -> out/full_sft_512.pth

The folder holds model.safetensors (tied embedding stored once), config.json, generation_config.json (eos
[<|im_end|>, <|endoftext|>], so generation stops), the tokenizer and its chat template. MoE models are written as our
own class (model_type "minimind"): they load where this repo is installed, or elsewhere with trust_remote_code=True.
For llama.cpp / Ollama see the README (convert_hf_to_gguf.py on the exported folder).
"""

from __future__ import annotations

import argparse
from hashlib import sha256
from pathlib import Path

import torch

from model.loading import (add_model_args, checkpoint_path, model_from_args, out_dir, resolve_path, save_transformers,
                           save_weights)


# llama.cpp identifies a BPE pre-tokenizer by the sha256 of the ids of this probe text (convert_hf_to_gguf.py,
# get_vocab_base_pre; llama.cpp is MIT-licensed). A self-trained vocabulary gives an unknown hash, which it refuses.
LLAMA_CPP_PROBE = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'


def llama_cpp_vocab_hash(tokenizer) -> str:
    """The ``chkhsh`` llama.cpp's converter computes for this tokenizer."""
    return sha256(str(tokenizer.encode(LLAMA_CPP_PROBE)).encode()).hexdigest()


def llama_cpp_hint(tokenizer) -> str:
    """The two lines to add to llama.cpp's ``get_vocab_base_pre`` so it converts this vocabulary: our byte-level BPE
    splits text with GPT-2's regex, which llama.cpp calls the ``gpt-2`` pre-tokenizer."""
    return (f'        if chkhsh == "{llama_cpp_vocab_hash(tokenizer)}":\n'
            f'            res = "gpt-2"  # minimind-lab byte-level BPE (GPT-2 split regex)')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--merge_lora", default=None, help="LoRA name or path to merge in first (same as --lora_weight)")
    p.add_argument("--output", default=None,
                   help="to transformers: a folder (default <out_dir>/<checkpoint>-hf); to .pth: a file (default from --save_weight)")
    p.add_argument("--save_weight", default="converted", help="to .pth: out/<save_weight>_<hidden>[_moe].pth")
    p.add_argument("--save_dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="stored precision (default: float32 for transformers, float16 for .pth as MiniMind saves)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args()
    if args.merge_lora:
        args.lora_weight = args.merge_lora
    args.device, args.dtype = "cpu", "float32"  # convert exactly, whatever the machine has

    to_torch = args.load_from != "model"
    try:
        model, tokenizer = model_from_args(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if to_torch:
        output = resolve_path(args.output) if args.output else checkpoint_path(args.save_weight, model.config, args.out_dir)
    else:
        name = Path(str(args.weight))  # a stage name or a path: name the folder after the checkpoint file
        stem = name.stem if name.suffix or len(name.parts) > 1 else f"{name}_{model.config.suffix}"
        stem += f"_{Path(str(args.lora_weight)).stem}" if args.lora_weight not in (None, "None", "none", "") else ""
        output = resolve_path(args.output) if args.output else out_dir(args.out_dir) / f"{stem}-hf"
    if output.exists() and not args.overwrite:
        raise SystemExit(f"error: {output} exists; pass --overwrite to replace it, or --output elsewhere")
    if to_torch:
        save_weights(model, output, getattr(torch, args.save_dtype or "float16"))
        print(f"wrote {output} ({model.config.describe()}); chat: python eval_llm.py --weight {output}")
    else:
        save_transformers(model, tokenizer, output, getattr(torch, args.save_dtype or "float32"))
        kind = "minimind (trust_remote_code)" if model.config.use_moe else ("qwen3" if model.config.qk_norm else "llama")
        print(f"wrote {output} ({kind}); chat: python eval_llm.py --load_from {output}")
        if not model.config.use_moe:
            print("llama.cpp: in convert_hf_to_gguf.py's get_vocab_base_pre (conversion/base.py in recent versions), "
                  f"add\n{llama_cpp_hint(tokenizer)}\nthen: python convert_hf_to_gguf.py {output} --outtype f16")


if __name__ == "__main__":
    main()
