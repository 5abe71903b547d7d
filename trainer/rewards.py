"""The rewards of the RL stages: small functions of one reply, chosen by --rewards, each logged under its own name,
plus an optional reward model read from a local folder (--reward_model_path).

MiniMind's rule rewards (train_grpo.py), with the verifiable-answer and format rewards added:

    length      +0.5 if the reply is 20-800 characters, else -0.5
    think       with a </think>: +1 if the thinking is 20-300 characters, else -0.5; +0.25 if there is exactly one
                </think>, else -0.25; 0 without one
    repetition  minus the share of repeated word 3-grams of the answer, at most 0.5
    answer      rows with a "gt": 1 if the final answer matches it (numbers: numerically; text: exactly, ignoring case
                and end punctuation; a list of facts: the share found in the answer), else 0; 0 without a "gt"
    format      +0.5 if the reply ended with <|im_end|> within --max_gen_len, else -0.5

The agent stage's tool episodes (trainer/train_agent.py), MiniMind's train_agent.py rewards, each its own component:

    tool_format  -0.5 for each tool call that is no valid call (its tool answered with an error: not JSON, an
                 unclosed <tool_call>, an unknown tool, arguments that do not fit its schema)
    tool_count   episodes that called tools: +0.5 if the valid calls number exactly the row's facts ("gt", one per
                 call needed), else -0.5 per call too many or too few
    tool_answer  episodes that called tools and finished: 2.5 x the share of the row's facts found in the final answer
                 (as a substring, or a number as one of its numbers)
    finish       -0.5 if the episode did not end with an answer (still calling tools at --max_turns, or cut off)
length and think score only episodes that called no tool, as MiniMind's; the total is clipped to +-3 (``clip_total``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

THINK_END = "</think>"


@dataclass
class Reply:
    text: str  # the sampled reply, special tokens dropped (a tool episode: its last assistant turn)
    finished: bool  # it ended with a stop token within --max_gen_len (a tool episode: with an answer, no call)
    row: dict[str, Any] = field(default_factory=dict)  # its prompt's data row: "messages", "gt", ...
    tool_results: list[dict[str, Any]] = field(default_factory=list)  # a tool episode: every call's answer, in order


RewardFn = Callable[[Reply], float]


def answer_text(text: str) -> str:
    """The reply after its (last) think block."""
    return text.rsplit(THINK_END, 1)[-1].strip()


def length_reward(reply: Reply) -> float:
    if reply.tool_results:
        return 0.0
    return 0.5 if 20 <= len(reply.text.strip()) <= 800 else -0.5


def think_reward(reply: Reply) -> float:
    if THINK_END not in reply.text or reply.tool_results:
        return 0.0
    thinking = reply.text.split(THINK_END, 1)[0].replace("<think>", "")
    reward = 1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5
    return reward + (0.25 if reply.text.count(THINK_END) == 1 else -0.25)


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """The share of the text's word n-grams that repeat an earlier one (words: runs of letters/digits/CJK characters,
    or single punctuation marks)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def repetition_reward(reply: Reply) -> float:
    return -min(0.5, repeated_ngram_share(answer_text(reply.text)))


NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def as_number(text: str) -> float | None:
    try:
        return float(str(text).replace(",", "").strip())
    except ValueError:
        return None


def fact_found(fact: Any, answer: str) -> bool:
    """A fact is in the answer as a substring, or (a number) as one of its numbers."""
    if str(fact).strip().lower() in answer.lower():
        return True
    value = as_number(fact)
    return value is not None and any(math.isclose(as_number(m), value, rel_tol=1e-6, abs_tol=1e-9)
                                     for m in NUMBER.findall(answer))


def answer_reward(reply: Reply) -> float:
    gt = reply.row.get("gt")
    if gt is None:
        return 0.0
    answer = answer_text(reply.text)
    if isinstance(gt, list):  # agent RL's facts
        return sum(fact_found(fact, answer) for fact in gt) / len(gt) if gt else 0.0
    value = as_number(gt)
    if value is not None:  # the last number of the answer is the final one
        numbers = NUMBER.findall(answer)
        return float(bool(numbers) and math.isclose(as_number(numbers[-1]), value, rel_tol=1e-6, abs_tol=1e-9))

    def norm(s: str) -> str:
        return re.sub(r"[\s.。!！?？]+$", "", str(s).strip().lower())
    return float(norm(answer) == norm(gt))


def format_reward(reply: Reply) -> float:
    return 0.5 if reply.finished else -0.5


def valid_calls(reply: Reply) -> int:
    return sum("error" not in result for result in reply.tool_results)


def tool_format_reward(reply: Reply) -> float:
    return -0.5 * (len(reply.tool_results) - valid_calls(reply))


def tool_count_reward(reply: Reply) -> float:
    if not reply.tool_results:
        return 0.0
    gap = abs(valid_calls(reply) - len(reply.row.get("gt") or []))
    return 0.5 if gap == 0 else -0.5 * gap


def tool_answer_reward(reply: Reply) -> float:
    if not reply.tool_results or not reply.finished:
        return 0.0
    return 2.5 * answer_reward(reply) if isinstance(reply.row.get("gt"), list) else 0.0


def finish_reward(reply: Reply) -> float:
    return 0.0 if reply.finished else -0.5


REWARDS: dict[str, RewardFn] = {"length": length_reward, "think": think_reward, "repetition": repetition_reward,
                                "answer": answer_reward, "format": format_reward, "tool_format": tool_format_reward,
                                "tool_count": tool_count_reward, "tool_answer": tool_answer_reward,
                                "finish": finish_reward}


def parse_rewards(names: str) -> dict[str, RewardFn]:
    """``"length,think"`` -> those reward functions; an unknown name is a ValueError listing the known ones."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward {', '.join(unknown)}: choose from {', '.join(REWARDS)}")
    return {n: REWARDS[n] for n in chosen}


class RewardModel:
    """A reward model from a local folder: any transformers ``AutoModelForSequenceClassification`` with one label,
    scored on the chat rendered with its own tokenizer's template, or an InternLM2-reward-style model
    (``trust_remote_code``, ``get_score(tokenizer, messages)``, MiniMind's). Scores are clipped to ±``clip``; a NaN
    score stays NaN, so the reply is skipped and counted (``reward_skipped``) rather than rewarded."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 clip: float = 3.0):
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--reward_model_path {path}: no config.json there; give the folder of a "
                                    f"transformers reward model (e.g. python scripts/download_data.py "
                                    f"internlm2-1_8b-reward)")
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
            remote = "AutoModel" in (getattr(config, "auto_map", None) or {}) and \
                "ForSequenceClassification" not in str(getattr(config, "architectures", ""))
            loader = AutoModel if remote else AutoModelForSequenceClassification
            self.model = loader.from_pretrained(folder, dtype=dtype, trust_remote_code=remote).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
        except Exception as e:  # a half-downloaded or foreign folder: one line, not a traceback
            raise FileNotFoundError(f"--reward_model_path {path}: cannot load a reward model from it "
                                    f"({type(e).__name__}: {e})") from None
        self.get_score = getattr(self.model, "get_score", None)
        if self.get_score is None and getattr(self.model.config, "num_labels", 1) != 1:
            raise FileNotFoundError(f"--reward_model_path {path}: a classifier with {self.model.config.num_labels} "
                                    f"labels; a reward model has one (its score)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device, self.clip = device, clip

    @torch.no_grad()
    def __call__(self, replies: list[Reply]) -> list[float]:
        chats = [[*r.row["messages"], {"role": "assistant", "content": answer_text(r.text)}] for r in replies]
        if self.get_score is not None:
            scores = [float(self.get_score(self.tokenizer, chat)) for chat in chats]
        else:
            texts = [self.tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            scores = self.model(**enc).logits[:, 0].float().tolist()
        # clamped as a tensor: a NaN stays NaN (and is skipped and counted), where min/max would make it +clip
        return torch.tensor(scores).clamp(-self.clip, self.clip).tolist()


def score(replies: list[Reply], rewards: dict[str, RewardFn],
          reward_model: Callable[[list[Reply]], list[float]] | None = None) -> dict[str, torch.Tensor]:
    """Each component's rewards for ``replies`` (float32 [N]), the reward model's under "reward_model"."""
    components = {name: torch.tensor([fn(r) for r in replies], dtype=torch.float32) for name, fn in rewards.items()}
    if reward_model is not None:
        components["reward_model"] = torch.tensor(reward_model(replies), dtype=torch.float32)
    return components


def clip_total(components: dict[str, torch.Tensor], limit: float) -> dict[str, torch.Tensor]:
    """The components and one more, "clip": what brings their sum into ±``limit`` (0 where it is inside), so the
    components still add up to the reward trained on and the log shows how much clipping took."""
    total = sum(components.values())
    return {**components, "clip": total.clamp(-limit, limit) - total}
