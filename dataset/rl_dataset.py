"""Prompts for the RL stages (GRPO, PPO): MiniMind's rlaif.jsonl / rlaif-mini.jsonl rows as they are.

    {"conversations": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "无"}]}
    {"conversations": [{"role": "system", "content": "...", "tools": "[...]"}, {"role": "user", ...}], "gt": "42"}

A last assistant turn is a placeholder and is dropped; what is left must end with a user (or tool) turn, the one the
policy answers. ``gt`` (optional: a string, a number or a list of facts) is what a verifiable reward checks.
"""

from __future__ import annotations

from typing import Any

from dataset.chat import _ChatRows, _messages
from dataset.files import DataError, preview


class RLPromptDataset(_ChatRows):
    """Items are plain rows, not tokens: ``{"index", "messages", "tools", "gt"}`` (the rollout renders and samples
    them). ``index`` is the row's position in the file: the rollout seeds its sampling from it, so a prompt's replies
    do not depend on which rank or batch it lands in."""

    def encode_row(self, row: Any, where: str) -> dict[str, Any]:
        if not isinstance(row, dict) or "conversations" not in row:
            raise DataError(f"{where}: expected an object with a 'conversations' key, got {preview(row)}")
        turns = row["conversations"]
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
            turns = turns[:-1]  # the placeholder reply
        # _messages validates a chat with a reply: give it an empty one, and take it off again
        messages, tools = _messages(list(turns) + [{"role": "assistant", "content": ""}], where)
        messages = messages[:-1]
        if not messages or messages[-1]["role"] not in ("user", "tool"):
            raise DataError(f"{where}: a prompt must end with a user turn, got {preview(row['conversations'])}")
        return {"messages": messages, "tools": tools, "gt": row.get("gt")}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i % len(self), **super().__getitem__(i)}


def rows_collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch of prompt rows is the list of them."""
    return items
