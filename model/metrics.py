"""Repetition metrics for generated text and the eight standard prompts they are measured on, shared by eval_llm.py
and the hands-on notebooks.

Units: a ``str`` is measured in characters (right for Chinese, where a character is roughly a word), a list of ints
in token ids. Say which you used when you report a number.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


# The eight prompts MiniMind's users compare models on (our wording): skills, sky, code, biology, weather,
# comparison, a definition, food. Pretrained models get openings on the same topics to continue.
CHAT_PROMPTS = [
    "你有哪些拿手的本领？",
    "天空为什么看起来是蓝色的？",
    "请用Python写一个计算斐波那契数列的函数。",
    "简单解释一下光合作用是怎么回事。",
    "你觉得明天会下雨吗？",
    "比较一下猫和狗作为宠物各有什么优缺点。",
    "什么是机器学习？请通俗地讲一讲。",
    "推荐几道有代表性的中国美食，并说说它们的特点。",
]
PLAIN_PROMPTS = [
    "我最擅长的事情是",
    "天空之所以呈现蓝色，是因为",
    "用Python计算斐波那契数列，可以这样写：",
    "光合作用是植物",
    "明天会不会下雨，要看",
    "猫和狗是人类最常见的两种宠物，",
    "机器学习是人工智能的一个分支，",
    "中国美食种类繁多，",
]


def ngrams(seq: Sequence, n: int = 4) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def ngram_repetition(seq: Sequence, n: int = 4) -> float:
    """Share of n-gram occurrences that belong to an n-gram occurring more than once.

    0.0: no n-gram repeats; 1.0: every n-gram occurs at least twice (e.g. "abcabcabc" with n = 3).
    Text shorter than n has no n-grams and scores 0.0.
    """
    grams = ngrams(seq, n)
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


def windowed_repetition(seq: Sequence, n: int = 4, window: int = 50, weighted: bool = False) -> float:
    """Distance-aware repetition ("W4R" for n = 4): for each n-gram position, the share of the positions within
    ±``window`` that hold the same n-gram, averaged over positions.

    Code and lists repeat n-grams far apart legitimately; a looping model repeats them close together. With
    ``weighted=True`` a repeat at distance d counts ``1 - d / (window + 1)`` (nearer repeats weigh more), and the
    share is taken over the same weights. Text with no repeats scores 0.0; a single n-gram repeated forever tends to
    1.0. (Never divide by a global maximum instead: that scores repeat-free text 1.0.)
    """
    grams = ngrams(seq, n)
    if len(grams) < 2:
        return 0.0
    total = 0.0
    for i, gram in enumerate(grams):
        same = seen = 0.0
        for j in range(max(0, i - window), min(len(grams), i + window + 1)):
            if j == i:
                continue
            w = 1 - abs(i - j) / (window + 1) if weighted else 1.0
            seen += w
            same += w * (grams[j] == gram)
        total += same / seen
    return total / len(grams)
