"""Build poetry_genres.csv: a balanced 5-class Chinese genre set (唐诗 / 宋词 / 论语 / 诗经 / 元曲).

Source: the npm package ``chinese-poetry`` (MIT licence, https://github.com/chinese-poetry/chinese-poetry), installed
into a temporary folder. Tang poems ship in traditional script; they are converted to simplified with OpenCC
(``pip install opencc``, Apache-2.0) so that the script itself does not give the class away.

    python hands-on/classification/make_dataset.py            # writes poetry_genres.csv beside this file
    python hands-on/classification/make_dataset.py --per_class 300 --max_chars 120
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# label -> (files under dist/, field holding the lines)
SOURCES = {
    "唐诗": ("quantangshi/poet.tang.*.json", "paragraphs"),
    "宋词": ("songci/ci.song.*.json", "paragraphs"),
    "论语": ("lunyu/lunyu.json", "paragraphs"),
    "诗经": ("shijing/shijing.json", "content"),
    "元曲": ("yuanqu/yuanqu.json", "paragraphs"),
}


def clip(lines: list[str], max_chars: int) -> str:
    """Whole lines (sentences) up to ``max_chars`` characters; a first line longer than that is cut."""
    text = ""
    for line in lines:
        if text and len(text) + len(line) > max_chars:
            break
        text += line.strip()
    return text[:max_chars]


def items(dist: Path, label: str) -> list[str | list[str]]:
    """Every unit of a genre: a poem (list of lines), or for 论语 a single paragraph."""
    pattern, field = SOURCES[label]
    out = []
    for path in sorted(dist.glob(pattern)):
        for entry in json.loads(path.read_text(encoding="utf-8")):
            lines = entry.get(field) or []
            out.extend(lines if label == "论语" else [lines])  # 论语: each paragraph is one saying
    return out


def build(dist: Path, per_class: int, max_chars: int, min_chars: int, seed: int) -> list[tuple[str, str]]:
    import opencc

    t2s = opencc.OpenCC("t2s")
    rng = random.Random(seed)
    rows = []
    for label in SOURCES:
        texts = {clip([l] if isinstance(l, str) else l, max_chars) for l in items(dist, label)}
        texts = sorted(t for t in texts if len(t) >= min_chars)
        chosen = rng.sample(texts, min(per_class, len(texts)))
        rows += [(t2s.convert(t) if label == "唐诗" else t, label) for t in chosen]
    rng.shuffle(rows)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per_class", type=int, default=240)
    p.add_argument("--max_chars", type=int, default=96)
    p.add_argument("--min_chars", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "poetry_genres.csv"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "install", "--prefix", tmp, "--no-audit", "--no-fund", "chinese-poetry@2.0.1"],
                       check=True)
        rows = build(Path(tmp) / "node_modules/chinese-poetry/dist", args.per_class, args.max_chars,
                     args.min_chars, args.seed)
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
