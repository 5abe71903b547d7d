"""bench.py runs on CPU in a tiny configuration and prints well-formed tables (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_prints_markdown_tables_and_json(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--hidden_size", "64", "--num_hidden_layers", "2",
         "--batch_size", "2", "--seq_len", "32", "--steps", "1", "--repeats", "1", "--warmup", "1",
         "--gen_lengths", "4", "--rollout", "2", "3", "5", "--compare", "dtype", "attention", "data",
         "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    tables, current = [], []
    for line in out.stdout.splitlines() + [""]:  # a table is a run of consecutive lines starting with "|"
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables, current = tables + ["\n".join(current)], []
    assert len(tables) == 3  # training, generation, rollout
    for table in tables:
        rows = [line for line in table.strip().splitlines()]
        assert rows[1].startswith("|---")
        assert len({row.count("|") for row in rows}) == 1  # every row has the header's column count
    train_rows = tables[0].strip().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in train_rows] == [
        "baseline", "dtype bf16", "dtype fp16", "plain attention", "pack + document mask", "pad (one doc per row)"]
    results = json.loads((tmp_path / "r.json").read_text())
    measured = [r for r in results["train"] if "skipped" not in r]
    assert all(r["tok_s"] > 0 and r["real_tok_s"] <= r["tok_s"] for r in measured)
    assert {(r["new_tokens"], r["kv_cache"]) for r in results["generate"]} == {(4, "dynamic"), (4, "static"), (4, "none")}
    [rollout] = results["rollout"]
    assert (rollout["prompts"], rollout["generations"], rollout["new_tokens"]) == (2, 3, 5)
    assert 0 < rollout["tok_s"] <= 2 * 3 * 5 / rollout["seconds"]  # at most every sampled token counts


def test_bench_times_lora_and_dora_against_full_training():
    from scripts.bench import main

    results = main(["--hidden_size", "64", "--num_hidden_layers", "2", "--batch_size", "2", "--seq_len", "32",
                    "--steps", "1", "--repeats", "1", "--warmup", "1", "--gen_lengths", "--rollout", "--compare",
                    "adapter", "--device", "cpu"])
    full, lora, dora = results["train"]
    assert [full["variant"], lora["variant"], dora["variant"]] == ["baseline", "LoRA r16", "DoRA r16"]
    assert full["trainable"] == 1 and 0 < lora["trainable"] < dora["trainable"] < 1  # DoRA adds m: one per row
    assert all(r["step_ms"] > 0 for r in results["train"])
