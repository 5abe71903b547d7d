"""Cutting long text where tokenising the pieces gives the tokens of the whole, so that a huge row costs the memory
of a small one (a tokenizer holds ~100 bytes per token of its input: a 50 MB row took 9 GB).

A safe cut is a position where the split regex of byte-level BPE tokenizers (GPT-2's, which ours uses; Llama-3's and
Qwen's are alike) always starts a new pre-token whatever comes next:
- before a space that lies between two non-space characters ("word| next"),
- after a newline that lies between two non-space characters ("line\\n|next"),
- between a letter and an ASCII or CJK punctuation mark ("word|, next", "你好|。").
No pattern of those regexes matches across such a position (none continues a run of non-space characters with a space
or a newline, nor a letter run with punctuation), and the only look-ahead, ``\\s+(?!\\S)``, ends a run of whitespace,
never a non-space character; BPE never merges across pre-tokens. So tokens(text[:cut]) + tokens(text[cut:]) ==
tokens(text) for these tokenizers, unless the cut falls inside an added token such as "<|im_end|>" (matched before
the regex runs), or next to one, which ``safe_cut`` rules out. tests/test_dataset.py checks the equality on random text.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from typing import Any

SAFE_CUT = re.compile(r"(?<=\S)(?= \S)|(?<=\S\n)(?=\S)|(?<=[^\W\d_])(?=[!-/:-@\[-`{-~，。！？；：、])")


def safe_cut(text: str, start: int, end: int, added_tokens: Collection[str]) -> int | None:
    """The first safe cut in ``text[start:end]`` that splits no added token, or None."""
    for match in SAFE_CUT.finditer(text, start, end):
        cut = match.start()
        # an occurrence of `token` in this window (two of them long) contains or touches the cut
        if not any(token in text[max(0, cut - len(token)):cut + len(token)] for token in added_tokens):
            return cut
    return None


def text_pieces(text: str, max_chars: int, added_tokens: Collection[str]) -> Iterator[str]:
    """``text`` in pieces of at most max_chars characters, cut at safe cuts, so that the pieces tokenise as the whole
    does. Where the last half of a piece holds no safe cut (no space, newline or punctuation in max_chars / 2
    characters: not prose), it is cut at max_chars anyway, and only the tokens at that cut may differ."""
    start = 0
    while len(text) - start > max_chars:
        cut = safe_cut(text, start + max_chars // 2, start + max_chars, added_tokens)
        cut = start + max_chars if cut is None else cut
        yield text[start:cut]
        start = cut
    yield text[start:]  # the whole text, not a copy, when it is short


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters of text one token covers: its length in the vocabulary. A byte-level token
    is written there one character per byte, and a character is at least one byte; an added token is written as
    itself. (It holds for any tokenizer whose normalizer does not shorten text; byte-level BPE has none.)"""
    return max(len(token) for token in tokenizer.get_vocab())
