"""Shared code of the classification notebooks: data, split, prompts, reply parsing, label-token scoring, metrics,
plots. The notebooks run with this folder as the working directory, so ``import cls_utils`` just works.

文本分类实验的公共代码：数据加载、划分、提示词、回复解析、标签 token 打分、指标与作图。
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # torch is imported where it is used: notebooks 01 and 04 start without it
    import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
POETRY_CSV = HERE / "poetry_genres.csv"
# English names for plots when no CJK font is installed (matplotlib would draw empty boxes)
ALIASES = {"唐诗": "Tang shi", "宋词": "Song ci", "论语": "Analects", "诗经": "Shijing", "元曲": "Yuan qu"}


# ---------------------------------------------------------------------------------------------------------------------
# data


def resolve_out_dir(path: str | os.PathLike, smoke: bool = False) -> Path:
    """The checkpoint folder as ``model.files.out_dir`` finds it: a relative path in the current directory if it
    is there, else in the repo root. Kept here so the notebooks that need no model (01, 04) start without importing
    torch and transformers. ``smoke``: its ``smoke/`` subfolder, so a SMOKE=1 run's split, results and checkpoints
    never mix with a real run's."""
    path = Path(path).expanduser()
    path = path.resolve() if path.is_absolute() or path.exists() else REPO_ROOT / path
    return path / "smoke" if smoke else path


def load_poetry(path: str | os.PathLike = POETRY_CSV) -> pd.DataFrame:
    """The bundled 5-genre set (``text,label``; built by make_dataset.py from npm chinese-poetry, MIT)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def load_bbc(path: str | os.PathLike) -> pd.DataFrame:
    """The BBC News CSV used by many tutorials: tab-separated ``category, filename, title, content``.

    Returns ``text,label`` with text = title + ". " + content. Quotes are ordinary characters (``QUOTE_NONE``): news
    text is full of them and the file does not quote its fields.
    """
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
    missing = {"category", "title", "content"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: expected tab-separated columns category, filename, title, content; "
                         f"missing {sorted(missing)} (found {list(df.columns)})")
    text = (df["title"].str.strip() + ". " + df["content"].str.strip()).str.replace(r"\s+", " ", regex=True)
    return pd.DataFrame({"text": text, "label": df["category"].str.strip()})


def load_dataset(name: str) -> pd.DataFrame:
    """``"poetry"`` (bundled) or a path to a BBC-style tab-separated file / a ``text,label`` CSV."""
    if name == "poetry":
        return load_poetry()
    with open(name, encoding="utf-8") as f:
        header = f.readline()
    return load_bbc(name) if "\t" in header else pd.read_csv(name, dtype=str, keep_default_na=False)


def stratified_split(df: pd.DataFrame, test_frac: float = 0.2, seed: int = 42) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per label, a seeded shuffle; the first ``round(n * test_frac)`` rows go to test. Same seed, same split."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for _, group in df.groupby("label", sort=True):
        idx = rng.permutation(group.index.to_numpy())
        test_idx.extend(idx[: round(len(idx) * test_frac)])
    test = df.loc[sorted(test_idx)]
    train = df.drop(index=test.index)
    return train.reset_index(drop=True), test.reset_index(drop=True)


def save_split(train: pd.DataFrame, test: pd.DataFrame, work_dir: str | os.PathLike) -> Path:
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    train.to_csv(work_dir / "train.csv", index=False)
    test.to_csv(work_dir / "test.csv", index=False)
    (work_dir / "labels.json").write_text(json.dumps(sorted(train["label"].unique()), ensure_ascii=False))
    return work_dir


def load_split(work_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(train, test, labels) written by 01_split.ipynb; run that notebook first."""
    work_dir = Path(work_dir)
    if not (work_dir / "labels.json").is_file():
        raise FileNotFoundError(f"no split in {work_dir}: run 01_split.ipynb first")
    read = lambda name: pd.read_csv(work_dir / name, dtype=str, keep_default_na=False)  # noqa: E731
    return read("train.csv"), read("test.csv"), json.loads((work_dir / "labels.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# prompts and replies


def is_cjk(s: str) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", s))


def build_prompt(text: str, labels: Sequence[str], shots: Sequence[tuple[str, str]] = ()) -> str:
    """The user turn: the task, optional solved examples (few-shot), then the text. Chinese labels → Chinese prompt."""
    zh = is_cjk("".join(labels))
    if zh:
        head = f"请判断下面这段文字属于哪一类，只回答类别名称（{'、'.join(labels)}之一）。\n"
        item = "文字：{}\n类别：{}"
    else:
        head = f"Classify the text into one of: {', '.join(labels)}. Answer with the category name only.\n"
        item = "Text: {}\nCategory: {}"
    examples = [item.format(t, l) for t, l in shots]
    return head + "\n\n".join([*examples, item.format(text, "").rstrip()])


def few_shot_examples(train: pd.DataFrame, per_label: int = 1, seed: int = 0) -> list[tuple[str, str]]:
    """``per_label`` training rows of each label, shuffled (fixed seed), as (text, label) pairs."""
    picked = train.groupby("label", sort=True).sample(per_label, random_state=seed).sample(frac=1, random_state=seed)
    return list(zip(picked["text"], picked["label"]))


def sft_rows(df: pd.DataFrame, labels: Sequence[str]) -> list[dict]:
    """SFT conversations (MiniMind's jsonl format): the zero-shot prompt → the label."""
    return [{"conversations": [{"role": "user", "content": build_prompt(t, labels)},
                               {"role": "assistant", "content": l}]} for t, l in zip(df["text"], df["label"])]


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return path


def parse_reply(reply: str, labels: Sequence[str]) -> str | None:
    """The label a reply names: the one mentioned first (case-insensitive); None if it names none (unparseable)."""
    low = reply.lower()
    found = [(low.find(label.lower()), -len(label), label) for label in labels if label.lower() in low]
    return min(found)[2] if found else None


# ---------------------------------------------------------------------------------------------------------------------
# the model: chat generation and label-token scoring


def chat_prompt_ids(tokenizer, user_texts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n`` for each text."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=True, add_generation_prompt=True,
                                          return_dict=False) for t in user_texts]


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def generate_replies(model, tokenizer, user_texts: Sequence[str], max_new_tokens: int = 16,
                     batch_size: int = 16) -> list[str]:
    """Greedy replies, batched (left padding), decoded without special tokens."""
    device, out = next(model.parameters()).device, []
    prompts = chat_prompt_ids(tokenizer, user_texts)
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id, device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    return out


def label_first_tokens(tokenizer, labels: Sequence[str]) -> list[int]:
    """The first token of each label *at the answer position* (right after ``<|im_start|>assistant\\n``).

    Read off the tokenised conversation, not the label alone, so a merge across the boundary would be noticed.
    Raises ValueError when two labels start with the same token: their logits could not tell them apart.
    """
    prompt = chat_prompt_ids(tokenizer, ["x"])[0]
    firsts = []
    for label in labels:
        full = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": label}],
                                             tokenize=True, return_dict=False)
        if full[:len(prompt)] != prompt:
            raise ValueError(f"label {label!r} changes the tokens of the prompt before it")
        firsts.append(full[len(prompt)])
    clashes = {}
    for label, tok in zip(labels, firsts):
        clashes.setdefault(tok, []).append(label)
    clashes = {tok: ls for tok, ls in clashes.items() if len(ls) > 1}
    if clashes:
        detail = "; ".join(f"{ls} all start with token {tok} ({tokenizer.decode([tok])!r})" for tok, ls in clashes.items())
        raise ValueError(f"label words must start with distinct tokens: {detail}. Rename the labels.")
    return firsts


def label_logits(model, tokenizer, user_texts: Sequence[str], label_ids: Sequence[int],
                 batch_size: int = 16) -> torch.Tensor:
    """[N, n_labels] logits of each label's first token at the answer position."""
    import torch

    device, rows = next(model.parameters()).device, []
    prompts = chat_prompt_ids(tokenizer, user_texts)
    index = torch.tensor(label_ids, device=device)
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_pad(prompts[start:start + batch_size], tokenizer.pad_token_id, device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]  # left padding: the last column is real
        rows.append(logits.float().index_select(-1, index).cpu())
    return torch.cat(rows)


def classify_by_label_logits(model, tokenizer, texts: Sequence[str], labels: Sequence[str],
                             batch_size: int = 16) -> list[str]:
    """Pick the label whose first token the model finds likeliest as the answer: never unparseable."""
    ids = label_first_tokens(tokenizer, labels)
    scores = label_logits(model, tokenizer, [build_prompt(t, labels) for t in texts], ids, batch_size)
    return [labels[i] for i in scores.argmax(-1).tolist()]


def label_token_loss(label_ids: Sequence[int]):
    """A loss for the training engine (``Stage(loss_fn=..., loss_weight=row_count)``): cross entropy over the label
    tokens' logits only, a mean over rows.

    The batch is an SFTDataset batch of prompt → label conversations, so the first supervised position holds the
    label's first token; the logits one position earlier predict it. The rest of the vocabulary plays no part: the LM
    head becomes an n-way classifier.
    """
    import torch

    from dataset import IGNORE_INDEX

    index = torch.tensor(list(label_ids))

    def loss_fn(model, batch):
        labels = batch["labels"]
        answer = (labels != IGNORE_INDEX).int().argmax(1)  # first supervised position = the label's first token
        rows = torch.arange(len(labels), device=labels.device)
        idx = index.to(labels.device)
        logits = model(input_ids=batch["input_ids"]).logits[rows, answer - 1].float().index_select(-1, idx)
        target = (labels[rows, answer].unsqueeze(1) == idx).int().argmax(1)
        return torch.nn.functional.cross_entropy(logits, target), {}

    return loss_fn


def row_count(batch) -> int:
    """What ``label_token_loss`` is a mean over (a ``Stage.loss_weight``): rows, one label each."""
    return len(batch["input_ids"])


def freeze_embedding_and_lower_half(model, args=None) -> None:
    """Freeze the token embedding (and so the tied LM head) and the lower half of the layers (a ``Stage.setup``)."""
    layers = model.model.layers
    model.model.embed_tokens.requires_grad_(False)
    for layer in layers[: len(layers) // 2]:
        layer.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# metrics and plots


def confusion(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> pd.DataFrame:
    """Rows: true label; columns: predicted label, plus "unparsed" for replies naming no label."""
    cols = [*labels, "unparsed"]
    cm = pd.DataFrame(0, index=list(labels), columns=cols)
    for t, p in zip(y_true, y_pred):
        cm.loc[t, p if p in labels else "unparsed"] += 1
    return cm


def scores(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro-F1 (mean of per-label F1; an unparsed reply is a miss) and the unparsed count."""
    cm = confusion(y_true, y_pred, labels)
    f1s = []
    for label in labels:
        tp = cm.loc[label, label]
        predicted, actual = cm[label].sum(), cm.loc[label].sum()
        f1s.append(0.0 if tp == 0 else 2 * tp / (predicted + actual))
    return {"accuracy": float(np.trace(cm[list(labels)].to_numpy()) / max(len(y_true), 1)),
            "macro_f1": float(np.mean(f1s)), "unparsed": int(cm["unparsed"].sum()), "n": len(y_true)}


def cjk_font() -> str | None:
    """A font that draws Chinese, if one is installed (Noto/Source Han, SimHei, PingFang, WenQuanYi, ...)."""
    from matplotlib import font_manager

    wanted = ("CJK", "SimHei", "Microsoft YaHei", "PingFang", "WenQuanYi", "Heiti", "Source Han", "Arial Unicode")
    return next((f.name for f in font_manager.fontManager.ttflist if any(w in f.name for w in wanted)), None)


def display_names(labels: Sequence[str]) -> list[str]:
    """Labels as they can be drawn: Chinese when a CJK font exists, else the English aliases."""
    font = cjk_font()
    if font:
        import matplotlib

        matplotlib.rcParams["font.sans-serif"] = [font, *matplotlib.rcParams["font.sans-serif"]]
        return list(labels)
    return [ALIASES.get(l, l) if is_cjk(l) else l for l in labels]


def plot_confusion(cm: pd.DataFrame, title: str, ax=None):
    """Heat map of a confusion() table with counts in the cells; the "unparsed" column only when it is not empty."""
    import matplotlib.pyplot as plt

    if cm["unparsed"].sum() == 0:
        cm = cm.drop(columns="unparsed")
    ax = ax or plt.subplots(figsize=(5, 4))[1]
    ax.imshow(cm.to_numpy(), cmap="Blues")
    names = display_names(list(cm.index))
    ax.set_xticks(range(cm.shape[1]), names + ["unparsed"] * (cm.shape[1] > len(names)), rotation=45, ha="right")
    ax.set_yticks(range(cm.shape[0]), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = cm.to_numpy().max()
    for (i, j), v in np.ndenumerate(cm.to_numpy()):
        ax.text(j, i, v, ha="center", va="center", color="white" if v > top / 2 else "black")
    return ax


def save_result(work_dir: str | os.PathLike, method: str, y_true, y_pred, labels, seconds: float | None = None) -> dict:
    """Scores + confusion matrix of one method, written to ``<work_dir>/results/<method>.json`` for 04_results;
    ``seconds``: the wall-clock time the method took (fine-tuning included), for the results table."""
    result = {"method": method, **scores(y_true, y_pred, labels), "seconds": seconds,
              "confusion": confusion(y_true, y_pred, labels).to_dict(orient="split")}
    path = Path(work_dir) / "results" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', method)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1))
    return result


def load_results(work_dir: str | os.PathLike) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(work_dir) / "results").glob("*.json"))]


RESULT_COLUMNS = ("accuracy", "macro_f1", "unparsed", "n", "seconds")


def results_table(results: list[dict]) -> pd.DataFrame:
    """One row a method (best accuracy first): accuracy, macro-F1, unparsed replies, test rows, seconds taken
    (empty for a result saved before times were kept)."""
    table = pd.DataFrame(results).set_index("method").reindex(columns=list(RESULT_COLUMNS))
    return table.sort_values("accuracy", ascending=False)


def report(work_dir: str | os.PathLike, method: str, y_true, y_pred, labels, seconds: float | None = None) -> pd.Series:
    """save_result() + the confusion-matrix plot: what each experiment ends with."""
    result = save_result(work_dir, method, y_true, y_pred, labels, seconds)
    plot_confusion(confusion(y_true, y_pred, labels), f"{method}: accuracy {result['accuracy']:.1%}")
    return pd.Series({k: result[k] for k in RESULT_COLUMNS}, name=method)
