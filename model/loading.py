"""The one public entry for tools: a stage name, ``.pth`` or transformers folder (+ LoRA) -> (model, tokenizer), with
errors that say what to do, and the command-line flags that pick one (``add_model_args`` / ``model_from_args``).

eval_llm.py, scripts/ and the notebooks load models through here; the pieces live beside it: ``model.files`` (paths,
atomic writes), ``model.weights`` (save/read/load a state dict), ``model.checkpoint_config`` (the config a file needs),
``model.hf_interop`` (transformers folders), ``model.devices`` (device and dtype).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from model.checkpoint_config import config_for_state_dict
from model.devices import best_device, check_device, resolve_dtype
from model.files import TOKENIZER_DIR, checkpoint_path, out_dir, resolve_path
from model.generation import stop_token_ids
from model.hf_interop import read_transformers_folder
from model.model_lora import load_lora, lora_path, merge_lora
from model.model_minimind import PRESETS, MiniMindConfig, MiniMindForCausalLM
from model.weights import check_vocabulary, load_state_dict_into, read_state_dict, save_weights, vocab_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# The training script that writes each stage's checkpoint, and the stage whose checkpoint it starts from (its default
# --from_weight), for the "Make it with" hints.
TRAIN_SCRIPTS = {"pretrain": "train_pretrain.py", "full_sft": "train_full_sft.py", "dpo": "train_dpo.py",
                 "full_dist": "train_distillation.py", "grpo": "train_grpo.py", "ppo_actor": "train_ppo.py",
                 # the demo's tool-call SFT: full SFT again, on the bundled tool rows
                 "full_sft_tools": "train_full_sft.py --data_path dataset/demo/sft_tools.jsonl --from_weight full_sft "
                                   "--save_weight full_sft_tools --max_seq_len 1024",
                 "agent": "train_agent.py"}
STARTS_FROM = {"full_sft": "pretrain", "dpo": "full_sft", "full_dist": "full_sft", "grpo": "full_sft",
               "ppo_actor": "full_sft", "full_sft_tools": "full_sft",
               "agent": "full_sft_tools"}  # the demo's start (on a GPU with MiniMind's data: full_sft)
MAKE_IT_WITH = "Make it with (in the repo root): "  # the rest of the line is the command, runnable as printed
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# MiniMind's --inference_rope_scaling, attention_factor 1.0 included (its choice), so its weights give its numbers.
YARN_16X = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 2048, "beta_fast": 32, "beta_slow": 1,
            "attention_factor": 1.0}


def load_model(
    weight: str | os.PathLike = "full_sft",
    *,
    hidden_size: int | None = None,
    num_hidden_layers: int | None = None,
    use_moe: bool | None = None,
    preset: str | None = None,
    lora: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    rope_scaling: dict | None = None,
) -> tuple[MiniMindForCausalLM, PreTrainedTokenizerBase]:
    """The model (eval mode, on ``device``) and its tokenizer, from any of:

    - a stage name, as MiniMind names checkpoints: ``"full_sft"`` -> ``<directory>/full_sft_512.pth`` (the shape
      flags pick the suffix: ``hidden_size``/``use_moe``/``preset``; default 512 dense);
    - a path to a ``.pth`` / ``.safetensors`` state dict (ours or an official MiniMind one);
    - a transformers folder (``config.json`` + weights): ours (``minimind``), or a ``llama``/``qwen3`` one of a
      shape this model can hold (what ``save_transformers`` writes, and what MiniMind's released folders hold).

    The file decides the shape: the config is read off the tensors, so ``--weight full_sft --hidden_size 768`` loads
    the 16-layer MiniMind2 without ``--num_hidden_layers 16``; flags that disagree with the file get a note on
    stderr. Fields the tensors cannot tell (RMSNorm eps, MoE top-k) come from ``preset`` or from the preset of the
    same shape. ``lora``: a LoRA name (``out/lora/lora_<name>_<suffix>.pth``) or path, merged into the weights (same
    outputs as the unmerged adapter, no extra cost per token). ``tokenizer``: a folder (default: the folder's own,
    else ours in ``model/``); MiniMind's released weights need MiniMind's (same special ids, other vocabulary). A
    file whose config records another vocabulary than the tokenizer's is refused.
    ``rope_scaling``: e.g. ``YARN_16X`` to extend the context at inference (MiniMind's --inference_rope_scaling).
    """
    source = find_weights(weight, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=use_moe,
                          preset=preset, directory=directory)
    if source.is_dir():
        config, state = read_transformers_folder(source)
    else:
        state = read_state_dict(source)
        config = config_for_state_dict(state, source, preset=preset)
        # The file decides the shape; size flags that disagree with it only get a note.
        typed = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=use_moe)
        for flag, value in typed.items():
            if value is not None and value != getattr(config, flag):
                print(f"note: {source} has --{flag} {int(getattr(config, flag))}, not {int(value)}: using the file's "
                      "shape", file=sys.stderr)
    if rope_scaling:
        config.rope_scaling = rope_scaling
    model = MiniMindForCausalLM(config)
    model.name_or_path = str(source)  # where it came from, as from_pretrained records it (the server names it)
    load_state_dict_into(model, state, source)
    if lora:
        _merge_lora_file(model, lora, directory)
    folder_tokenizer = source.is_dir() and (source / "tokenizer_config.json").is_file()
    tok = load_tokenizer(source if folder_tokenizer and tokenizer is None else tokenizer)
    if folder_tokenizer and config.tokenizer_vocab is None:  # a Llama export's vocabulary: the tokenizer saved with it
        config.tokenizer_vocab = vocab_fingerprint(tok) if tokenizer is None else _folder_vocabulary(source)
    check_vocabulary(config.tokenizer_vocab, vocab_fingerprint(tok), source,
                     "pass --tokenizer with the folder it was trained with")
    if tokenizer is None and config.tokenizer_vocab is None:
        print(f"note: {source} does not record its tokenizer; using the one in model/. MiniMind's released weights "
              f"need MiniMind's (--tokenizer path/to/minimind/model), or the replies are gibberish", file=sys.stderr)
    device = check_device(device or best_device())
    model = model.to(device=device, dtype=resolve_dtype(device, dtype)).eval()
    # So a bare model.generate() (a notebook's) stops at <|im_end|> too, instead of running to max_length.
    model.generation_config.eos_token_id = stop_token_ids(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _folder_vocabulary(folder: Path) -> str | None:
    """The vocabulary of the tokenizer saved in a transformers folder; None (with a note) when it does not load."""
    try:
        return vocab_fingerprint(load_tokenizer(folder))
    except (OSError, ValueError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        print(f"note: the tokenizer in {folder} does not load ({reason}); the vocabulary of --tokenizer is not "
              f"checked against it", file=sys.stderr)
        return None


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The shipped tokenizer (``model/``) or another folder, e.g. MiniMind's own (needed for MiniMind's weights)."""
    from transformers import AutoTokenizer

    folder = resolve_path(path) if path else TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder} (expected tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(folder))


def looks_like_path(text: str) -> bool:
    """Whether a --weight / --lora_weight value is a file path (a weights suffix or a folder in it) rather than a
    name such as ``full_sft`` that the naming scheme turns into a path."""
    return Path(text).suffix in WEIGHT_SUFFIXES or "/" in text or os.sep in text


def find_weights(
    weight: str | os.PathLike,
    hidden_size: int | None = None,
    use_moe: bool | None = None,
    preset: str | None = None,
    directory: str | os.PathLike | None = None,
    num_hidden_layers: int | None = None,
) -> Path:
    """The file or folder ``weight`` names; a missing one fails naming the path and the command that makes it (a model
    of the shape the flags ask for: the file name records only the hidden size)."""
    text = str(weight)
    if looks_like_path(text) or Path(text).expanduser().exists():
        path = resolve_path(text)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint at {path}")
        return path
    shape = dict(PRESETS[preset]) if preset else {}
    typed = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, use_moe=use_moe)
    shape.update({k: v for k, v in typed.items() if v is not None})
    shape.setdefault("hidden_size", 512)
    config = MiniMindConfig(**shape)
    path = checkpoint_path(text, config, directory)
    if path.is_file():
        return path
    others = _stage_files(path.parent, text)
    if len(others) == 1 and hidden_size is None and use_moe is None and preset is None:
        print(f"note: using {others[0][0]} (the only {text} checkpoint there)", file=sys.stderr)
        return others[0][0]
    raise FileNotFoundError(_missing_checkpoint_message(path, text, others, config, directory))


# MiniMind's checkpoint names: <stage>_<hidden>[_moe].pth
_STAGE_FILE = re.compile(r"(?P<stage>.+)_(?P<hidden>\d+)(?P<moe>_moe)?\.pth")


def _stage_files(folder: Path, stage: str) -> list[tuple[Path, str, bool]]:
    """The checkpoints of ``stage`` in ``folder``, each with its hidden size (as the name writes it) and whether it
    is MoE."""
    files = []
    for path in sorted(folder.glob("*.pth")):
        match = _STAGE_FILE.fullmatch(path.name)
        if match and match["stage"] == stage:
            files.append((path, match["hidden"], bool(match["moe"])))
    return files


def _missing_checkpoint_message(path: Path, stage: str, others: list[tuple[Path, str, bool]],
                                config: MiniMindConfig, directory: str | os.PathLike | None) -> str:
    """Why ``stage`` has no checkpoint at ``path``: the other sizes there, the command that trains it (or, for a name
    no trainer uses, the checkpoints there), and the other ways to get weights."""
    lines = [f"no checkpoint {path}."]
    for other, hidden, moe in others:
        lines.append(f"Found {other}: load it with --hidden_size {hidden} --use_moe {int(moe)}")
    if stage in TRAIN_SCRIPTS:
        lines.append(make_it_with(stage, config, directory))
        lines.append("(on a CPU, or without MiniMind's data in dataset/, each is a demo-sized run of minutes)")
    else:
        there = sorted(p.name for p in path.parent.glob("*.pth") if not p.stem.endswith("_resume"))
        lines.append(f"No training stage is called '{stage}' ({', '.join(TRAIN_SCRIPTS)}; other names come from "
                     f"--save_weight). Checkpoints in {path.parent}: {', '.join(there) or 'none'}.")
    lines.append("Or put MiniMind's released .pth there (ModelScope gongjy/minimind-3-pytorch), or pass a path or a "
                 "transformers folder (--load_from DIR).")
    return "\n".join(lines)


def trainer_command(script: str, config: MiniMindConfig, directory: str | os.PathLike | None = None,
                    *flags: str) -> str:
    """``python trainer/<script> FLAGS`` with every size flag of ``config`` (so it writes the file of that name and
    shape) and ``--out_dir`` when ``directory`` is given, quoted: runnable as printed, from the repo root."""
    sizes = config.describe().split(" (")[0].split()  # fields no flag sets (in parentheses) cannot be passed anyway
    where = ["--out_dir", str(out_dir(directory))] if directory else []
    return shlex.join(["python", f"trainer/{script}", *flags, *sizes, *where])


def make_it_with(stage: str, config: MiniMindConfig, directory: str | os.PathLike | None = None) -> str:
    """``MAKE_IT_WITH`` and one command that writes ``stage``'s checkpoint of ``config``'s shape in
    ``directory``: its trainer, after those of the stages it starts from that have no checkpoint there (joined by
    ``&&``); "" for a name no trainer writes."""
    commands = []
    # The stage itself, then each stage it starts from, until one whose checkpoint is there.
    while stage in TRAIN_SCRIPTS and not (commands and checkpoint_path(stage, config, directory).is_file()):
        script, *flags = shlex.split(TRAIN_SCRIPTS[stage])
        commands.insert(0, trainer_command(script, config, directory, *flags))
        stage = STARTS_FROM.get(stage)
    return MAKE_IT_WITH + " && ".join(commands) if commands else ""


def random_checkpoint(directory: str | os.PathLike | None, hidden_size: int = 64, num_hidden_layers: int = 2,
                      stage: str = "full_sft") -> Path:
    """``<directory>/<stage>_<hidden>.pth``: made, unless it is there, from random weights (seeded; the caller's RNG is
    left alone) with our tokenizer's vocabulary. For checks of the code around a model in seconds, such as the
    notebooks' SMOKE=1 runs: its replies are noise."""
    tok = load_tokenizer()
    config = MiniMindConfig(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, vocab_size=len(tok),
                            tokenizer_vocab=vocab_fingerprint(tok))
    path = checkpoint_path(stage, config, directory)
    if not path.is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            save_weights(MiniMindForCausalLM(config), path)
    return path


def _merge_lora_file(model: nn.Module, lora: str | os.PathLike, directory: str | os.PathLike | None) -> None:
    text = str(lora)
    path = resolve_path(text) if looks_like_path(text) else lora_path(text, model.config, directory)
    if not path.is_file():
        if looks_like_path(text):
            raise FileNotFoundError(f"no LoRA file {path}")
        base = Path(model.name_or_path)  # the weights it was loaded from: the adapter trains on them
        start = ("--from_weight", str(base)) if base.is_file() else ()
        command = trainer_command("train_lora.py", model.config, directory, "--lora_name", text, *start)
        raise FileNotFoundError(f"no LoRA file {path}. {MAKE_IT_WITH}{command}\n(it trains on "
                                f"dataset/lora_{text}.jsonl, or add --data_path FILE; only identity falls back to the "
                                f"bundled demo set)")
    load_lora(model, path)
    merge_lora(model)


def add_model_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags that pick a model, as MiniMind's eval_llm.py spells them; read them back with ``model_from_args``."""
    g = parser.add_argument_group("model (which weights; 加载哪个模型)")
    g.add_argument("--weight", default="full_sft",
                   help="stage name (out/<weight>_<hidden>[_moe].pth: pretrain, full_sft, dpo, ...) or a .pth path "
                        "(default full_sft)")
    g.add_argument("--load_from", default="model",
                   help="'model': our .pth weights (--weight); else a transformers folder "
                        "(save_pretrained / converted)")
    g.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)} (names the file like its flags)")
    g.add_argument("--hidden_size", type=int, default=None, help="picks the file suffix (default 512)")
    g.add_argument("--num_hidden_layers", type=int, default=None, help="optional: the file's own shape is used")
    g.add_argument("--use_moe", type=int, default=None, choices=[0, 1], help="picks the _moe file (default 0)")
    g.add_argument("--lora_weight", default=None, help="LoRA name (out/lora/lora_<name>_<hidden>.pth) or path")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: the transformers folder's, else model/)")
    g.add_argument("--out_dir", "--save_dir", dest="out_dir", default=None,
                   help="where stage names are looked up (default: out/ in the repo)")
    g.add_argument("--inference_rope_scaling", action="store_true", help="YaRN x16 context extension (长文本外推)")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best there is)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 on CUDA, fp16 on MPS, fp32 on CPU")
    return parser


def weight_arg(args: argparse.Namespace) -> str:
    """The weights the flags of ``add_model_args`` name: --load_from's folder, else --weight."""
    return args.weight if args.load_from == "model" else args.load_from


def lora_arg(args: argparse.Namespace) -> str | None:
    """--lora_weight, None for no LoRA (MiniMind's scripts pass the word "None")."""
    return None if args.lora_weight in (None, "", "None", "none") else args.lora_weight


def model_from_args(args: argparse.Namespace) -> tuple[MiniMindForCausalLM, PreTrainedTokenizerBase]:
    """``load_model`` with the flags of ``add_model_args``."""
    return load_model(
        weight_arg(args), hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
        use_moe=None if args.use_moe is None else bool(args.use_moe), preset=args.preset, lora=lora_arg(args),
        tokenizer=args.tokenizer, directory=args.out_dir, device=args.device, dtype=args.dtype,
        rope_scaling=YARN_16X if args.inference_rope_scaling else None,
    )
