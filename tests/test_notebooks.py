"""The hands-on notebooks execute headless in smoke mode (tiny random model, a handful of rows), and the shared
classification module (hands-on/classification/cls_utils.py) does what its notebooks rely on."""

import importlib.util
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient

from model import MiniMindForCausalLM
from model.loading import load_model, load_tokenizer, random_checkpoint

HANDS_ON = Path(__file__).resolve().parents[1] / "hands-on"
CLASSIFICATION = HANDS_ON / "classification"
NOTEBOOKS = sorted(HANDS_ON.rglob("*.ipynb"))


def _load_cls_utils():
    """Import cls_utils from its file (the notebooks import it from their working directory)."""
    spec = importlib.util.spec_from_file_location("cls_utils", CLASSIFICATION / "cls_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cls_utils = _load_cls_utils()


@pytest.fixture(scope="module")
def smoke_env(tmp_path_factory):
    """An empty checkpoint dir and the environment that points the notebooks at it: smoke mode makes its own tiny
    model (in <dir>/smoke/, like everything else it writes)."""
    out = tmp_path_factory.mktemp("out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOKE", "1")
        mp.setenv("MINIMIND_OUT_DIR", str(out))
        mp.setenv("MPLBACKEND", "Agg")
        yield out


def execute(path: Path) -> None:
    """Run every cell in a fresh kernel with the notebook's folder as the working directory; raise on a cell error."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


def test_sampling_notebook(smoke_env):
    execute(HANDS_ON / "sampling.ipynb")
    assert [p.name for p in smoke_env.iterdir()] == ["smoke"]  # its model too: out/smoke/, not out/
    saved = smoke_env / "smoke" / "sampling"  # what the docs' tables and figure are copied from
    sweeps = pd.read_csv(saved / "sweeps.csv")
    assert set(sweeps.knob) == {"temperature", "top_p", "top_k"} and {"length", "rep4", "w4r"} <= set(sweeps.columns)
    assert (saved / "decoding.csv").is_file() and (saved / "sweeps.png").stat().st_size > 0


def test_classification_notebooks(smoke_env):
    """Split → prompting → fine-tuning (engine, 2 steps each) → results, in order: each reads what the last wrote."""
    for name in ["01_split", "02_prompting", "03_finetune", "04_results"]:
        execute(CLASSIFICATION / f"{name}.ipynb")
    assert [p.name for p in smoke_env.iterdir()] == ["smoke"]  # split, results, checkpoints: never beside a real run's
    work_dir = smoke_env / "smoke" / "classification"
    results = cls_utils.load_results(work_dir)
    methods = {r["method"] for r in results}
    assert {"zero-shot", "few-shot", "full SFT", "SFT, lower half frozen", "label-token classifier"} <= methods
    assert any(m.startswith("LoRA") for m in methods)
    assert all(r["seconds"] > 0 for r in results)  # each method's time, for the results table
    table = pd.read_csv(work_dir / "results.csv", index_col="method")  # what 04 saves for the docs
    assert set(table.index) == methods and list(table.columns) == list(cls_utils.RESULT_COLUMNS)
    assert (work_dir / "confusion.png").stat().st_size > 0 and (work_dir / "scores.png").stat().st_size > 0


def test_the_smoke_model_is_made_once_and_leaves_the_rng_alone(tmp_path):
    rng = torch.get_rng_state()
    path = random_checkpoint(tmp_path, 64, 2)
    assert torch.equal(torch.get_rng_state(), rng)  # a notebook's seeded sampling after it is unchanged
    written = path.stat().st_mtime_ns
    assert random_checkpoint(tmp_path, 64, 2) == path and path.stat().st_mtime_ns == written  # a model there is kept
    model, _ = load_model("full_sft", hidden_size=64, directory=tmp_path, device="cpu")
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)


# ---------------------------------------------------------------------------------------------------------------------
# cls_utils


def test_scores_on_a_hand_made_case():
    y_true = ["a", "a", "a", "b", "b", "c"]
    y_pred = ["a", "a", "b", "b", None, "c"]  # one unparsed reply
    s = cls_utils.scores(y_true, y_pred, ["a", "b", "c"])
    # F1(a) = 2·2/(2+3) = 0.8; F1(b) = 2·1/(2+2) = 0.5; F1(c) = 1
    assert s["macro_f1"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["unparsed"] == 1
    cm = cls_utils.confusion(y_true, y_pred, ["a", "b", "c"])
    assert cm.loc["a", "b"] == 1 and cm.loc["b", "unparsed"] == 1 and cm.to_numpy().sum() == 6


def test_parse_reply():
    zh = ["唐诗", "宋词", "论语", "诗经", "元曲"]
    assert cls_utils.parse_reply("这是一首唐诗。", zh) == "唐诗"
    assert cls_utils.parse_reply("宋词，不是唐诗", zh) == "宋词"  # the label named first
    assert cls_utils.parse_reply("我不知道", zh) is None
    en = ["business", "tech", "technology"]
    assert cls_utils.parse_reply("Category: Business.", en) == "business"
    assert cls_utils.parse_reply("technology news", en) == "technology"  # the longest label at the same place


def test_label_first_tokens_must_differ():
    tok = load_tokenizer()
    labels = ["唐诗", "宋词", "论语", "诗经", "元曲"]
    ids = cls_utils.label_first_tokens(tok, labels)
    assert len(set(ids)) == len(labels)
    with pytest.raises(ValueError, match="distinct"):
        cls_utils.label_first_tokens(tok, ["cat", "cat food"])


def test_label_token_loss_scores_the_position_inference_reads(tiny):
    """Training (label_token_loss) and inference (label_logits) look at the same position and the same tokens."""
    tok, labels = load_tokenizer(), ["唐诗", "宋词", "论语"]
    model = MiniMindForCausalLM(tiny(vocab_size=len(tok))).eval()
    ids = cls_utils.label_first_tokens(tok, labels)
    prompt = cls_utils.build_prompt("床前明月光", labels)
    prompt_ids = cls_utils.chat_prompt_ids(tok, [prompt])[0]
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": "宋词"}],
                                   tokenize=True, return_dict=False)
    batch = {"input_ids": torch.tensor([full]),
             "labels": torch.tensor([[-100] * len(prompt_ids) + full[len(prompt_ids):]])}
    loss, _ = cls_utils.label_token_loss(ids)(model, batch)
    expected = torch.nn.functional.cross_entropy(cls_utils.label_logits(model, tok, [prompt], ids), torch.tensor([1]))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_stratified_split_is_stratified_and_seeded():
    df = cls_utils.load_poetry()
    train, test = cls_utils.stratified_split(df, 0.2, seed=1)
    assert len(train) + len(test) == len(df) and not set(train.text) & set(test.text)
    assert (test.label.value_counts() == 48).all()  # 240 rows per class in the bundled set
    again, _ = cls_utils.stratified_split(df, 0.2, seed=1)
    assert again.equals(train)


def test_bundled_poetry_set():
    df = cls_utils.load_poetry()
    assert list(df.columns) == ["text", "label"]
    assert df.label.value_counts().to_dict() == {label: 240 for label in cls_utils.ALIASES}
    assert (CLASSIFICATION / "poetry_genres.csv").stat().st_size < 400_000


def test_load_bbc(tmp_path):
    rows = [("business", "001.txt", "Ad sales boost profits", 'Quarterly profits at "Time Warner" rose 76%.'),
            ("tech", "002.txt", "Phones go 3G", "Mobile phones\u00a0are getting faster."),
            ("sport", "003.txt", "Owen wins", "He said: \"I'm happy\" after the game."),
            ("politics", "004.txt", "Vote called", "The election was called."),
            ("entertainment", "005.txt", "Film tops box office", "A 'quoted' film did well.")] * 2
    path = tmp_path / "bbc-news-data.csv"
    path.write_text("category\tfilename\ttitle\tcontent\n" + "".join("\t".join(r) + "\n" for r in rows),
                    encoding="utf-8")
    df = cls_utils.load_bbc(path)
    assert len(df) == 10 and list(df.columns) == ["text", "label"]
    assert df.label.tolist()[:5] == ["business", "tech", "sport", "politics", "entertainment"]
    assert df.text[0] == 'Ad sales boost profits. Quarterly profits at "Time Warner" rose 76%.'
    assert cls_utils.load_dataset(str(path)).equals(df)
