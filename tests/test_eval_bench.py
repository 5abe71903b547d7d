"""scripts/eval_bench.py: lm-eval's own harness scores the model as the other tools load it, offline, on task YAMLs of
our own (tests/bench_tasks: C-Eval's prompt and metrics on twelve local items; gsm8k's own YAML on local items)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.files import REPO_ROOT
from model.hf_interop import save_transformers
from model.loading import load_tokenizer
from model.weights import save_weights, vocab_fingerprint
from scripts.eval_bench import harness_model, main
from tests.test_eval_llm import another_vocabulary, needs_tokenizer, tiny_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a dev requirement (requirements-eval.txt)")

pytestmark = needs_tokenizer
BENCH_TASKS = REPO_ROOT / "tests" / "bench_tasks"
ITEMS = [json.loads(line) for line in (BENCH_TASKS / "tiny_ceval.jsonl").read_text().splitlines()]
# gsm8k's own YAML (prompt, stop sequences, answer-extraction filters, exact match) on two local items.
GSM8K_ON_LOCAL_ITEMS = """include: {gsm8k}
task: tiny_gsm8k
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: tiny_gsm8k.jsonl
    test: tiny_gsm8k.jsonl
"""
GSM8K_ITEMS = [{"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
                "answer": "3 + 4 = 7\n#### 7"},
               {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "6 * 2 = 12\n#### 12"}]


def prompt(item: dict) -> str:
    """What lm-eval asks for one tiny_ceval item (C-Eval's doc_to_text); the answer follows after a space."""
    return f"{item['question']}\nA. {item['A']}\nB. {item['B']}\nC. {item['C']}\nD. {item['D']}\n答案："


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """A copy of tests/bench_tasks plus the gsm8k task, as the current directory (data_files are relative to it), with
    datasets' cache in a temporary folder. Every in-process run names this one folder: lm-eval's task index is built
    once (scripts.eval_bench.task_manager caches it)."""
    folder = tmp_path_factory.mktemp("bench_tasks")
    shutil.copytree(BENCH_TASKS, folder, dirs_exist_ok=True)
    gsm8k = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    (folder / "tiny_gsm8k.yaml").write_text(GSM8K_ON_LOCAL_ITEMS.format(gsm8k=gsm8k))
    (folder / "tiny_gsm8k.jsonl").write_text("".join(json.dumps(item) + "\n" for item in GSM8K_ITEMS))
    # A dataset that only a loading script can build (as some hub datasets still are), which datasets>=4 refuses.
    (folder / "scripted").mkdir()
    (folder / "scripted" / "scripted.py").write_text("import datasets\n")
    (folder / "tiny_scripted.yaml").write_text("include: tiny_ceval.yaml\ntask: tiny_scripted\ndataset_path: scripted\n"
                                               "dataset_kwargs: null\n")
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(folder / "datasets_cache"))
        yield folder


@pytest.fixture
def run_bench(capsys, tasks_dir):
    """scripts/eval_bench.py in this process on the tasks in ``tasks_dir``; its --json line read back."""
    def run(weights: Path, *flags: str) -> dict:
        main(["--weight", str(weights), "--include_path", str(tasks_dir), "--device", "cpu", "--json", *flags])
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    return run


def test_a_custom_task_runs_end_to_end_offline(tmp_path):
    """The script as a user runs it: a subprocess, offline, on the committed YAML; the table's numbers are lm-eval's
    (the accuracy is the mean of the per-item scores it writes to --output)."""
    tiny_checkpoint(tmp_path)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "eval_bench.py"), "--weight",
                           str(tmp_path / "full_sft_64.pth"), "--tasks", "tiny_ceval", "--include_path", ".",
                           "--device", "cpu", "--output", str(tmp_path / "lm_eval")],
                          cwd=BENCH_TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "full_sft_64.pth" in lines[0] and "0-shot" in lines[0] and "chat template off" in lines[0]
    assert lines[2] == "| task | metric | score ± stderr | chance | minimind-3 | items |"
    rows = {line.split(" | ")[1]: line.split(" | ") for line in lines[4:]}
    assert set(rows) == {"acc", "acc_norm"}
    samples = [json.loads(line) for line in next((tmp_path / "lm_eval").rglob("samples_tiny_ceval_*.jsonl")).open()]
    assert len(samples) == len(ITEMS) and [s["doc"]["question"] for s in samples] == [i["question"] for i in ITEMS]
    accuracy = 100 * sum(s["acc"] for s in samples) / len(samples)
    assert rows["acc"][2].startswith(f"{accuracy:.2f} ± ") and rows["acc"][3:6] == ["25.00", "—", "12 |"]


def test_accuracy_follows_what_the_model_learned(tmp_path, run_bench):
    """A model trained for 80 steps on text holding each item's right answer (its prompt followed by the letter) picks
    the right letter on all twelve items; the same model before training scores 2/12 (chance: 3/12, and the answers
    are spread evenly over A-D, so always picking one letter scores 3/12 too). A scorer that ignored the model could
    not tell the two apart."""
    tokenizer = load_tokenizer()
    model = tiny_checkpoint(tmp_path, tokenizer_vocab=vocab_fingerprint(tokenizer))
    before = run_bench(tmp_path / "full_sft_64.pth", "--tasks", "tiny_ceval")

    texts = [tokenizer(prompt(item) + " " + item["answer"]).input_ids for item in ITEMS]
    width = max(map(len, texts))
    inputs = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in texts])
    labels = torch.tensor([ids + [-100] * (width - len(ids)) for ids in texts])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        loss = model(input_ids=inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_weights(model, tmp_path / "trained.pth", dtype=torch.float32)
    after = run_bench(tmp_path / "trained.pth", "--tasks", "tiny_ceval")

    accuracy = [{row["metric"]: row["score"] for row in result["rows"]}["acc"] for result in (before, after)]
    assert accuracy[0] <= 0.5 and accuracy[1] == 1.0, accuracy
    assert before["rows"][0]["items"] == 12 and before["rows"][0]["chance"] == 0.25


def test_our_loaded_model_and_its_exported_folder_score_the_same(tmp_path):
    """The same item through lm-eval's wrapper around our loaded model and through lm-eval loading the exported
    transformers folder itself (a stock LlamaForCausalLM): the same log-likelihood for each answer."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    tokenizer = load_tokenizer()
    model = tiny_checkpoint(tmp_path)
    save_transformers(model, tokenizer, tmp_path / "hf")
    requests = [Instance(request_type="loglikelihood", doc=ITEMS[0], arguments=(prompt(ITEMS[0]), f" {letter}"), idx=i)
                for i, letter in enumerate("ABCD")]
    ours = harness_model(model, tokenizer).loglikelihood(requests)
    exported = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32").loglikelihood(requests)
    assert len({score for score, _ in ours}) == 4  # four different answers, four different scores
    torch.testing.assert_close(torch.tensor([s for s, _ in ours]), torch.tensor([s for s, _ in exported]),
                               rtol=0, atol=1e-4)


def test_chat_template_wraps_each_question_and_the_header_says_so(tmp_path, tasks_dir, capsys):
    tiny_checkpoint(tmp_path)
    contexts = {}
    for flags in ([], ["--chat_template"]):
        out = tmp_path / f"out{len(flags)}"
        main(["--weight", str(tmp_path / "full_sft_64.pth"), "--include_path", str(tasks_dir), "--device", "cpu",
              "--tasks", "tiny_ceval", "--limit", "2", "--output", str(out), *flags])
        header = capsys.readouterr().out.splitlines()[0]
        assert header.endswith(f"chat template {'on' if flags else 'off'} · limit 2")
        sample = json.loads(next(out.rglob("samples_tiny_ceval_*.jsonl")).open().readline())
        contexts[bool(flags)] = sample["arguments"]["gen_args_0"]["arg_0"]
    assert contexts[False] == prompt(ITEMS[0])
    assert contexts[True] == f"<|im_start|>user\n{prompt(ITEMS[0])}<|im_end|>\n<|im_start|>assistant\n"


def test_a_group_is_one_row_over_all_its_items(tmp_path, run_bench):
    """As ceval-valid (52 subjects) and cmmlu (67): the group's score is the mean over the items of all its tasks."""
    tiny_checkpoint(tmp_path)
    group = run_bench(tmp_path / "full_sft_64.pth", "--tasks", "tiny_exam", "--limit", "5")["rows"]
    single = run_bench(tmp_path / "full_sft_64.pth", "--tasks", "tiny_ceval", "--limit", "5")["rows"]
    assert [(row["task"], row["metric"], row["items"], row["chance"]) for row in group] == [
        ("tiny_exam", "acc", 10, 0.25), ("tiny_exam", "acc_norm", 10, 0.25)]
    assert [row["score"] for row in group] == pytest.approx([row["score"] for row in single])  # the same items twice


def test_gsm8k_generates_and_is_scored_by_exact_match(tmp_path, run_bench):
    tiny_checkpoint(tmp_path)
    result = run_bench(tmp_path / "full_sft_64.pth", "--tasks", "tiny_gsm8k", "--num_fewshot", "1")
    assert result["num_fewshot"] == [1]
    rows = {(row["metric"], row["filter"]): row for row in result["rows"]}
    assert set(rows) == {("exact_match", "strict-match"), ("exact_match", "flexible-extract")}
    assert all(row["items"] == 2 and row["chance"] is None and 0 <= row["score"] <= 1 for row in rows.values()), rows


def test_bad_input_is_one_line_without_a_traceback(tmp_path, tasks_dir):
    tokenizer = load_tokenizer()
    tiny_checkpoint(tmp_path, tokenizer_vocab=vocab_fingerprint(tokenizer))
    weights = ["--weight", str(tmp_path / "full_sft_64.pth"), "--include_path", str(tasks_dir), "--device", "cpu"]
    cases = [
        (weights + ["--tasks", "siqa"], "error: lm-eval has no task 'siqa'; close: social_iqa, "),
        (weights + ["--tasks", "arc_easy", "--limit", "1"],  # offline, and not in the (empty) datasets cache
         "error: Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled): the task data comes from"),
        (weights + ["--tasks", "tiny_scripted"],
         "error: Dataset scripts are no longer supported, but found scripted.py: this task's dataset needs a loading"),
        (weights + ["--tokenizer", str(another_vocabulary(tmp_path / "other"))],
         f"error: {tmp_path / 'full_sft_64.pth'} was trained with another tokenizer"),
        (["--weight", str(tmp_path / "none.pth")], f"error: no checkpoint at {tmp_path / 'none.pth'}"),
    ]
    for argv, start in cases:
        with pytest.raises(SystemExit) as exit:
            main(argv)
        message = str(exit.value.code)
        assert message.startswith(start) and "\n" not in message, message
