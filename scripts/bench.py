"""Measure training and generation speed, and print the Markdown tables the README quotes.

    python scripts/bench.py                                  # 26M preset, every comparison, this machine
    python scripts/bench.py --preset minimind2 --batch_size 32 --seq_len 512 --compare dtype compile
    python scripts/bench.py --json results.json              # the same numbers for machines

Training rows time one optimizer step (forward, backward, clip, AdamW) on batches of real demo data: warm-up steps
excluded, ``--repeats`` timings of ``--steps`` steps each, median reported. Each comparison changes one setting
against the baseline (auto dtype, fused SDPA attention, no compile, fused AdamW where available, packed rows, all
weights trained); ``--compare adapter`` times LoRA and DoRA (rank 16, default targets, base frozen) against it.
Generation rows time greedy decoding of ``--gen_lengths`` new tokens for one prompt (on CUDA, transformers compiles
the decode step with CUDA graphs when the KV cache is static). The rollout row times what an RL step samples
(``--rollout PROMPTS GENERATIONS NEW_TOKENS``): a batch of prompts x generations, each reply from its own generator,
through the sampling code GRPO and PPO use (model.generation.sample_replies: KV cache, fp32 weights under the
baseline dtype's autocast), counting the replies' tokens up to their stop token.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch

from dataset import IGNORE_INDEX, PretrainDataset, pad_collate, resolve_data_path
from model import MiniMindConfig, MiniMindForCausalLM
from model.cli import HelpFormatter
from model.flops import flops_per_token, peak_tflops
from model.generation import sample_replies
from model.devices import best_device, resolve_dtype
from model.loading import load_tokenizer
from model.model_lora import apply_lora, lora_parameter_count


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str
    attention: str = "sdpa"  # "sdpa" (fused kernels) or "plain" (matmul + softmax)
    compile: str = ""  # "" (eager), or a torch.compile mode: "default", "reduce-overhead" (adds CUDA graphs)
    fused_adamw: bool = True
    data: str = "pack"  # "pack": full rows; "docmask": packed, attention kept within documents; "pad": one
    # document per row, padded to the batch's longest
    adapter: str = ""  # "" (every weight trains), or "lora" / "dora": rank 16 on the default targets, base frozen


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def variants(baseline: Variant, compare: list[str]) -> list[Variant]:
    rows = [baseline]
    alternatives = {
        "dtype": [replace(baseline, name=f"dtype {d}", dtype=d) for d in ("bf16", "fp16", "fp32") if d != baseline.dtype],
        "attention": [replace(baseline, name="plain attention", attention="plain")],
        "compile": [replace(baseline, name="torch.compile", compile="default"),
                    replace(baseline, name="torch.compile + CUDA graphs", compile="reduce-overhead")],
        "fused": [replace(baseline, name="unfused AdamW", fused_adamw=False)],
        "data": [replace(baseline, name="pack + document mask", data="docmask"),
                 replace(baseline, name="pad (one doc per row)", data="pad")],
        "adapter": [replace(baseline, name="LoRA r16", adapter="lora"),
                    replace(baseline, name="DoRA r16", adapter="dora")],
    }
    for key in compare:
        rows += alternatives[key]
    return rows


def load_batches(tokenizer, batch_size: int, seq_len: int, count: int, device: torch.device) -> dict[str, list[dict]]:
    """``count`` batches per data mode from the pretrain data (the real file if present, else the bundled demo)."""
    path = resolve_data_path(None, ["pretrain_t2t_mini.jsonl", "pretrain_hq.jsonl"], "pretrain.jsonl")
    out = {}
    for mode in ("pack", "docmask", "pad"):
        data = PretrainDataset(path, tokenizer, seq_len, mode="pad" if mode == "pad" else "pack",
                               doc_mask=mode == "docmask")
        rows = [data[i % len(data)] for i in range(batch_size * count)]
        out[mode] = [{k: v.to(device) for k, v in pad_collate(rows[i : i + batch_size]).items()}
                     for i in range(0, len(rows), batch_size)]
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def bench_train(variant: Variant, config: MiniMindConfig, args, device: torch.device, data: list[dict]) -> dict:
    torch.manual_seed(0)
    dtype = DTYPES[variant.dtype]
    if device.type == "cpu" and variant.dtype == "fp16":
        return {"variant": variant.name, "skipped": "fp16 autocast is unusable on CPU"}
    if device.type != "cuda" and variant.compile == "reduce-overhead":
        return {"variant": variant.name, "skipped": "CUDA graphs need CUDA"}
    model = MiniMindForCausalLM(replace_config(config, flash_attn=variant.attention == "sdpa")).to(device).train()
    if variant.adapter:
        apply_lora(model, rank=16, lora_type=variant.adapter)
    trainable, total = lora_parameter_count(model)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = variant.fused_adamw and device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=variant.dtype == "fp16")
    step_model = torch.compile(model, mode=variant.compile) if variant.compile else model
    autocast = torch.autocast(device.type, dtype=dtype) if variant.dtype != "fp32" else nullcontext()

    def step(batch: dict) -> None:
        with autocast:
            loss = step_model(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids")).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(data[i % len(data)])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for i in range(args.steps):
            step(data[i % len(data)])
        sync(device)
        times.append((time.perf_counter() - start) / args.steps)
    if variant.name in (args.profile or []):
        print_profile(variant.name, lambda: step(data[0]), device)
    step_time = statistics.median(times)
    tokens = sum(b["input_ids"].numel() for b in data) / len(data)
    real = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in data) / len(data)
    row = {
        "variant": variant.name, "step_ms": step_time * 1e3, "tok_s": tokens / step_time, "real_tok_s": real / step_time,
        "peak_mem_gb": peak_memory_gb(device), "trainable": trainable / total,
    }
    peak = peak_tflops(device, args.peak_tflops)
    if peak and not variant.adapter:  # 6N FLOPs per token count weight gradients, which an adapter run skips
        row["mfu"] = flops_per_token(config, args.seq_len) * row["tok_s"] / (peak * 1e12)
    return row


def print_profile(name: str, step: Callable[[], None], device: torch.device, rows: int = 12) -> None:
    """Where one step's time goes: the most expensive kernels (CUDA) or operators (CPU), from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n## profile: {name}\n" + prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60))


def replace_config(config: MiniMindConfig, **changes) -> MiniMindConfig:
    return MiniMindConfig(**{**config.to_dict(), **changes})


def peak_memory_gb(device: torch.device) -> float:
    """CUDA: the allocator's peak since the timed steps began. CPU/MPS: the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@torch.inference_mode()
def bench_generate(config: MiniMindConfig, args, device: torch.device) -> list[dict]:
    model = MiniMindForCausalLM(config).to(device, resolve_dtype(device, training=True)).eval()
    prompt = torch.randint(3, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for length in args.gen_lengths:
        for cache in ("dynamic", "static", "none"):
            kwargs = dict(max_new_tokens=length, min_new_tokens=length, do_sample=False, pad_token_id=0)
            if cache == "none":
                kwargs["use_cache"] = False
            elif cache == "static":
                kwargs["cache_implementation"] = "static"
            # warm-up at the timed length: a static cache of another length is another shape, and on CUDA
            # transformers compiles the decode step for a static cache (once per shape)
            model.generate(prompt, **kwargs)
            times = []
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                out = model.generate(prompt, **kwargs)
                sync(device)
                times.append(time.perf_counter() - start)
            assert out.shape[1] == prompt.shape[1] + length
            rows.append({"new_tokens": length, "kv_cache": cache, "tok_s": length / statistics.median(times)})
            print(f"generation: {length} tokens, {cache} cache: {rows[-1]['tok_s']:,.1f} tokens/s", flush=True)
    return rows


@torch.inference_mode()
def bench_rollout(config: MiniMindConfig, args, device: torch.device, dtype: str) -> dict:
    """Sampled tokens/s for ``prompts`` x ``generations`` replies of up to ``new_tokens`` each (prompts of 32 random
    tokens, random weights: replies rarely stop early; the padding after a stop token is not counted)."""
    prompts, generations, new_tokens = args.rollout
    model = MiniMindForCausalLM(config).to(device)
    ids = torch.randint(3, config.vocab_size, (prompts, 32), generator=torch.Generator().manual_seed(0)).tolist()
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype]) if dtype != "fp32" else nullcontext()

    def sample(seed: int):
        generators = [torch.Generator(device).manual_seed(seed * 1000 + i) for i in range(prompts * generations)]
        with autocast:
            return sample_replies(model, [p for p in ids for _ in range(generations)], generators, new_tokens,
                                  temperature=1.0, stop_ids=[2, 0], pad_id=0)

    sample(0)  # warm-up
    times, tokens = [], []
    for seed in range(1, args.repeats + 1):
        sync(device)
        start = time.perf_counter()
        sampled = sample(seed)
        sync(device)
        times.append(time.perf_counter() - start)
        tokens.append(int(sampled.reply_mask.sum()))
    i = sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]  # the median run
    row = {"prompts": prompts, "generations": generations, "new_tokens": new_tokens, "dtype": dtype,
           "tok_s": tokens[i] / times[i], "seconds": times[i]}
    print(f"rollout: {row}", flush=True)
    return row


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [("—" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns]
        if "skipped" in row:
            cells = [row["variant"], f"skipped: {row['skipped']}"] + [""] * (len(columns) - 2)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="minimind2-small")
    p.add_argument("--hidden_size", type=int)
    p.add_argument("--num_hidden_layers", type=int)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--device")
    p.add_argument("--dtype", choices=list(DTYPES), help="baseline dtype (default: as the engine: bf16 on CUDA, fp32 on CPU/MPS)")
    p.add_argument("--compile", nargs="?", const="default", default="", choices=["default", "reduce-overhead"],
                   help="torch.compile the baseline too, in this mode (reduce-overhead: with CUDA graphs)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timing")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compare", nargs="*", default=["dtype", "attention", "compile", "fused", "data"],
                   choices=["dtype", "attention", "compile", "fused", "data", "adapter"])
    p.add_argument("--gen_lengths", type=int, nargs="*", default=[64, 256])
    p.add_argument("--rollout", type=int, nargs="*", default=[2, 6, 256], metavar="N",
                   help="the rollout row: PROMPTS GENERATIONS NEW_TOKENS sampled as one batch (none: no rollout row)")
    p.add_argument("--peak_tflops", type=float, help="GPU bf16 peak for MFU when the name is not in the table")
    p.add_argument("--profile", nargs="*", metavar="VARIANT",
                   help="print the top kernels of one step for these rows, e.g. baseline torch.compile")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.rollout and (len(args.rollout) != 3 or min(args.rollout) < 1):
        p.error(f"--rollout takes three positive numbers, PROMPTS GENERATIONS NEW_TOKENS (got {args.rollout})")

    device = torch.device(args.device or best_device())
    overrides = {k: v for k, v in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.num_hidden_layers)) if v}
    config = MiniMindConfig.from_preset(args.preset, **overrides)
    auto = DTYPE_NAMES[resolve_dtype(device, training=True)]  # the training engine's --dtype auto
    baseline = Variant("baseline", args.dtype or auto, compile=args.compile)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"# {args.preset} ({MiniMindForCausalLM(config).params_summary()}), batch {args.batch_size} × "
          f"{args.seq_len} tokens, {gpu}, torch {torch.__version__}, baseline {asdict(baseline)}\n")

    data = load_batches(load_tokenizer(), args.batch_size, args.seq_len, 4, device)
    train = []
    for variant in variants(baseline, args.compare):
        train.append(bench_train(variant, config, args, device, data[variant.data]))
        print(f"training: {train[-1]}", flush=True)
        torch._dynamo.reset()  # so one variant's compiled graphs don't count against the next one's recompile limit
    print(markdown(train, [("variant", "training", "{}"), ("step_ms", "step (ms)", "{:.0f}"),
                           ("tok_s", "tokens/s", "{:,.0f}"), ("real_tok_s", "non-pad tokens/s", "{:,.0f}"),
                           ("mfu", "MFU", "{:.1%}"), ("peak_mem_gb", "peak mem (GiB)", "{:.2f}"),
                           ("trainable", "trainable", "{:.2%}")]))
    generation = bench_generate(config, args, device) if args.gen_lengths else []
    if generation:
        print()
        print(markdown(generation, [("new_tokens", "new tokens", "{}"), ("kv_cache", "KV cache", "{}"),
                                    ("tok_s", "generation tokens/s", "{:,.1f}")]))
    rollout = [bench_rollout(config, args, device, baseline.dtype)] if args.rollout else []
    if rollout:
        print()
        print(markdown(rollout, [("prompts", "rollout: prompts", "{}"), ("generations", "generations", "{}"),
                                 ("new_tokens", "new tokens", "{}"), ("dtype", "dtype", "{}"),
                                 ("tok_s", "sampled tokens/s", "{:,.1f}")]))
    results = {"device": gpu, "torch": torch.__version__, "preset": args.preset, "config": overrides,
               "batch_size": args.batch_size, "seq_len": args.seq_len, "train": train, "generate": generation,
               "rollout": rollout}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
