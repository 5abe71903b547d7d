"""Convert between our checkpoints, transformers folders and GGUF.  模型格式转换（.pth <-> transformers，-> GGUF）。

    # ours -> transformers: dense -> LlamaForCausalLM, q/k-norm -> Qwen3ForCausalLM (no trust_remote_code needed)
    python scripts/convert_model.py --weight full_sft --hidden_size 512             # -> out/full_sft_512-hf/
    python scripts/convert_model.py --weight full_sft --merge_lora identity --output out/minimind-identity
    # transformers -> ours (a Llama / Qwen3 / minimind folder of a MiniMind shape)
    python scripts/convert_model.py --load_from out/full_sft_512-hf --save_weight full_sft   # -> out/full_sft_512.pth
    # ours -> one GGUF file that stock llama.cpp / Ollama run (dense models; llama.cpp needs no patch)
    python scripts/convert_model.py --weight full_sft --gguf                         # -> out/full_sft_512.gguf

The folder holds model.safetensors (tied embedding stored once), config.json, generation_config.json (eos
[<|im_end|>, <|endoftext|>], so generation stops), the tokenizer and its chat template. MoE models are written as our
own class (model_type "minimind"): they load where this repo is installed, or elsewhere with trust_remote_code=True.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.cli import HelpFormatter
from model.export_gguf import save_gguf
from model.files import checkpoint_path, out_dir, resolve_path
from model.hf_interop import save_transformers
from model.loading import add_model_args, lora_arg, model_from_args, weight_arg
from model.weights import save_weights

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from model.model_minimind import MiniMindForCausalLM


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_args(p)
    p.add_argument("--merge_lora", default=None, help="LoRA name or path to merge in first (same as --lora_weight)")
    p.add_argument("--output", default=None,
                   help="to transformers: a folder (default <out_dir>/<checkpoint>-hf); to GGUF: a file (default "
                        "<out_dir>/<checkpoint>.gguf); to .pth: a file (default from --save_weight)")
    p.add_argument("--save_weight", default="converted", help="to .pth: out/<save_weight>_<hidden>[_moe].pth")
    p.add_argument("--save_dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="stored precision (default: float32 for transformers, float16 for .pth as MiniMind saves)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--gguf", action="store_true",
                   help="write one GGUF file for llama.cpp / Ollama (f16; float32 with --save_dtype float32)")
    args = p.parse_args()
    if args.merge_lora:
        args.lora_weight = args.merge_lora
    args.device, args.dtype = "cpu", "float32"  # convert exactly, whatever the machine has

    target = "gguf" if args.gguf else "pth" if args.load_from != "model" else "hf"
    if target == "gguf" and args.save_dtype == "bfloat16":
        p.error("--gguf writes float16 (default) or float32 weights")
    try:
        model, tokenizer = model_from_args(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if target == "pth":
        output = (resolve_path(args.output) if args.output
                  else checkpoint_path(args.save_weight, model.config, args.out_dir))
    else:
        source = Path(str(weight_arg(args)))
        # a stage name or a path: name the output after the checkpoint file
        stem = source.stem if source.suffix or len(source.parts) > 1 else f"{source}_{model.config.suffix}"
        lora = lora_arg(args)
        stem += f"_{Path(lora).stem}" if lora else ""
        default = f"{stem}.gguf" if target == "gguf" else f"{stem}-hf"
        output = resolve_path(args.output) if args.output else out_dir(args.out_dir) / default
    if output.exists() and not args.overwrite:
        raise SystemExit(f"error: {output} exists; pass --overwrite to replace it, or --output elsewhere")
    try:
        print(write(target, model, tokenizer, output, args.save_dtype))
    except (OSError, ValueError) as e:  # a full disk (SaveError), a model GGUF cannot hold: one line, no traceback
        raise SystemExit(f"error: {e}") from None


def write(target: str, model: MiniMindForCausalLM, tokenizer: PreTrainedTokenizerBase, output: Path,
          save_dtype: str | None) -> str:
    """Write ``model`` to ``output`` as ``target`` ("pth", "gguf" or "hf"); returns what to print: where it went and
    the command that chats with it."""
    if target == "pth":
        save_weights(model, output, getattr(torch, save_dtype or "float16"))
        return f"wrote {output} ({model.config.describe()}); chat: {eval_llm_command('--weight', output)}"
    if target == "gguf":
        save_gguf(model, tokenizer, output, "f32" if save_dtype == "float32" else "f16")
        return f"wrote {output}; chat: {shlex.join(['llama-cli', '-m', str(output), '-cnv'])}   (Ollama: see README)"
    save_transformers(model, tokenizer, output, getattr(torch, save_dtype or "float32"))
    kind = "minimind (trust_remote_code)" if model.config.use_moe else "qwen3" if model.config.qk_norm else "llama"
    return f"wrote {output} ({kind}); chat: {eval_llm_command('--load_from', output)}"


def eval_llm_command(*flags: str | Path) -> str:
    """``python eval_llm.py FLAGS``, quoted so it runs as printed (a path may hold spaces)."""
    return shlex.join(["python", "eval_llm.py", *map(str, flags)])


if __name__ == "__main__":
    main()
