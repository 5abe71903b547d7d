"""Text generation shared by eval_llm.py, the OpenAI-style server and notebooks: thin helpers over HF ``generate``.

    config = generation_config(tokenizer, max_new_tokens=256, temperature=0.85, top_p=0.85)
    reply = ReplyStream(model, tokenizer, chat_prompt(tokenizer, messages), config)
    for piece in reply:                 # text as it is generated (a worker thread runs generate)
        print(piece, end="", flush=True)
    reply.completion_tokens, reply.tokens_per_second, reply.finish_reason

    sampled = sample_replies(model, prompts, generators, max_new_tokens=512, temperature=1.0, stop_ids=[2, 0],
                             pad_id=0)   # a batch of replies, each from its own generator (RL rollouts, bench.py)

Generation stops at ``<|im_end|>`` or ``<|endoftext|>`` (both are eos ids), or after ``max_new_tokens``.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, StopStringCriteria,
                          StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer)

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # ids 2 and 0 in MiniMind's tokenizer and ours
# Sampling at a temperature this low is argmax in all but name (a logit gap of 0.001 becomes a factor e^100), and far
# lower ones overflow the scaled logits to inf (1e-45 crashed sampling): below it, generation is greedy.
GREEDY_BELOW = 1e-5


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a reply: ``<|im_end|>`` (end of a turn) and ``<|endoftext|>`` (end of a document)."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[t] for t in STOP_TOKENS if t in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids or [2, 0]


def generation_config(
    tokenizer: Any,
    max_new_tokens: int = 512,
    temperature: float = 0.85,
    top_p: float = 0.85,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
) -> GenerationConfig:
    """Sampling settings with the stop ids filled in. ``temperature`` below ``GREEDY_BELOW`` (0 included) means greedy
    (argmax); ``top_k=0`` is off."""
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[-1]
    common = dict(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, num_beams=num_beams,
                  repetition_penalty=repetition_penalty, bos_token_id=tokenizer.bos_token_id)
    if temperature < GREEDY_BELOW:
        # Leave the sampling fields unset: transformers warns about them when do_sample is False.
        return GenerationConfig(do_sample=False, **common)
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, **common)


def chat_prompt(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                open_thinking: bool | None = None) -> str:
    """ChatML text for ``messages`` (and the ``tools`` they may call) ending with an open assistant turn:
    ``<|im_start|>assistant\n``, then with ``open_thinking`` True a live ``<think>\n`` block, with False a closed
    empty one (answer directly). None leaves it to the template's default (ours: neither; minimind-3's: closed)."""
    switch = {} if open_thinking is None else {"open_thinking": open_thinking}
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True, **switch)


def fit_history(tokenizer: Any, messages: list[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    """A sliding window over a long chat: drop the oldest turns (a system turn stays) until the prompt, with its open
    assistant turn, fits ``max_tokens``. The newest message always stays, even if it alone is longer."""
    system, turns = (messages[:1], messages[1:]) if messages and messages[0]["role"] == "system" else ([], messages)
    while len(turns) > 1 and len(tokenizer(chat_prompt(tokenizer, system + turns), add_special_tokens=False)
                                  .input_ids) > max_tokens:
        turns = turns[2:] if len(turns) > 2 and turns[0]["role"] == "user" else turns[1:]  # a whole exchange
    return system + turns


def plain_prompt(tokenizer: Any, text: str) -> str:
    """A pretrained (not chat-tuned) model continues text. In packed pretraining every document follows an
    ``<|endoftext|>`` separator, so a prompt that starts with one looks like the start of a document."""
    return ("<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else "") + text


class _Cancel(StoppingCriteria):
    """Lets the caller stop a running ``generate`` (Ctrl-C in the chat, a client that hung up on the server)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _CountingStreamer(TextIteratorStreamer):
    """TextIteratorStreamer that also counts the generated tokens and remembers the last one."""

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.count, self.last = 0, None

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:  # the first call carries the prompt
            self.count += value.numel()
            self.last = int(value.reshape(-1)[-1])
        super().put(value)


class ReplyStream:
    """One reply, generated in a worker thread and read as text pieces by iterating.

    Creating one does the preparation (the prompt's tokens, the tables that find ``config.stop_strings``: seconds
    for long ones), so a server can prepare a stream before it waits for its turn to generate. Leaving the loop early
    (break, Ctrl-C, a closed HTTP stream) stops generation at the next token. After the loop:
    ``text``, ``prompt_tokens``, ``completion_tokens``, ``seconds``, ``tokens_per_second`` and ``finish_reason``
    (``"stop"`` at a stop token, ``"length"`` at ``max_new_tokens``). Beam search cannot stream in transformers:
    with ``num_beams > 1`` the whole reply arrives as one piece.
    """

    def __init__(self, model: Any, tokenizer: Any, prompt: str, config: GenerationConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
        self.prompt_tokens = self.input_ids.shape[1]
        self.completion_tokens, self.seconds, self.text, self.finish_reason = 0, 0.0, "", "stop"
        self._cancel = threading.Event()
        # transformers matches stop strings on tokens, with tables it builds from the whole vocabulary: built here, and
        # generate gets a config without them, so it does not build them again
        self._stop_strings = [StopStringCriteria(tokenizer, config.stop_strings)] if config.stop_strings else []
        self._generate_config = copy.deepcopy(config)
        self._generate_config.stop_strings = None

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def __iter__(self) -> Iterator[str]:
        start = time.perf_counter()
        pieces: list[str] = []
        source = self._beam_search() if self.config.num_beams > 1 else self._stream()
        try:
            for piece in source:
                pieces.append(piece)
                yield piece
        finally:
            source.close()  # now, in this thread: stops the worker if we were left early
            self.seconds = time.perf_counter() - start
            self.text = "".join(pieces)

    def _generate(self, **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.generate(
                self.input_ids, attention_mask=torch.ones_like(self.input_ids), generation_config=self._generate_config,
                stopping_criteria=StoppingCriteriaList([_Cancel(self._cancel), *self._stop_strings]), **kwargs,
            )

    def _stream(self) -> Iterator[str]:
        streamer = _CountingStreamer(self.tokenizer)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self._generate(streamer=streamer)
            except BaseException as e:  # re-raised in the reading thread; end() unblocks its loop
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        try:
            yield from (piece for piece in streamer if piece)  # the streamer emits "" while a word is incomplete
        finally:
            self._cancel.set()  # no-op when generation already ended; else it stops at the next token
            worker.join()
            self.completion_tokens = streamer.count
            self._set_finish_reason(streamer.last)
        if errors:
            raise errors[0]

    def _beam_search(self) -> Iterator[str]:
        new = self._generate()[0, self.prompt_tokens:]
        self.completion_tokens = len(new)
        self._set_finish_reason(int(new[-1]) if len(new) else None)
        yield self.tokenizer.decode(new, skip_special_tokens=True)

    def _set_finish_reason(self, last: int | None) -> None:
        stops = self.config.eos_token_id
        stops = stops if isinstance(stops, list) else [stops]
        self.finish_reason = "stop" if last in stops or self.completion_tokens < self.config.max_new_tokens else "length"


# ----------------------------------------------------------------------------------------------------------------------
# reasoning: a reply that opens with <think>...</think> (a model trained on rows with reasoning_content), or that
# starts inside a <think> block its prompt opened (open_thinking)

THINK_START, THINK_END = "<think>", "</think>"  # how the chat template shows reasoning_content


def opens_thinking(prompt: str) -> bool:
    """Whether a prompt leaves a ``<think>`` block open, so the reply starts inside it (``thinking_open`` below)."""
    return prompt.rstrip("\n").endswith(THINK_START)



def answer_start(text: str, done: bool = True, thinking_open: bool = False) -> int | None:
    """Where the answer begins in a reply: after a leading ``<think>…</think>`` block, else at 0; None while that
    block is still open, or (mid-reply, ``done=False``) while the reply may yet open one. ``thinking_open``: the
    prompt opened the block, so the reply starts inside it."""
    if thinking_open:
        start = answer_start(THINK_START + text, done)
        return None if start is None else start - len(THINK_START)
    head = len(text) - len(text.lstrip())
    if not text.startswith(THINK_START, head):
        return None if not done and THINK_START.startswith(text[head:]) else 0
    end = text.find(THINK_END, head)
    return None if end < 0 else end + len(THINK_END)


def split_reasoning(text: str, done: bool = True, thinking_open: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a reply: a leading ``<think>\\n…\\n</think>\\n\\n`` block is the reasoning, the rest is
    the answer; a reply without one is all answer. With ``thinking_open`` (the prompt ended in ``<think>\\n``) the
    reply is reasoning up to its ``</think>``. Mid-reply (``done=False``) what may still change is held back (a
    beginning that may become ``<think>``, an end that may become ``</think>``, trailing newlines), so each call's
    result extends the previous one's."""
    if thinking_open:
        text = THINK_START + text
    start = answer_start(text, done)
    if start == 0:
        return "", text
    begin = text.find(THINK_START)
    if begin < 0:  # not a block yet, but may become one
        return "", ""
    begin += len(THINK_START)
    if start is None:  # the block is still open
        body = text[begin:]
        return (body if done else body[:len(body) - partial_marker(body, [THINK_END])]).strip("\n"), ""
    return text[begin:start - len(THINK_END)].strip("\n"), text[start:].lstrip("\n")


class ReasoningSplit:
    """``split_reasoning`` as a reply streams in: ``feed`` returns the new (reasoning, answer) text to send."""

    def __init__(self, thinking_open: bool = False):
        self.text, self.sent, self.thinking_open = "", (0, 0), thinking_open

    def feed(self, piece: str, done: bool = False) -> tuple[str, str]:
        self.text += piece
        reasoning, answer = split_reasoning(self.text, done, self.thinking_open)
        new = reasoning[self.sent[0]:], answer[self.sent[1]:]
        self.sent = len(reasoning), len(answer)
        return new


def partial_marker(text: str, markers: list[str]) -> int:
    """The length of the longest end of ``text`` that is the beginning of a marker (0: none)."""
    return max((k for marker in markers for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


# ---------------------------------------------------------------------------------------------------------------------
# Batched sampling with one random generator per reply: the RL rollouts (trainer/rollout.py) and bench.py's rollout row


class GumbelSampling(LogitsProcessor):
    """Sampling at ``temperature`` as greedy decoding of Gumbel-perturbed logits (argmax(l/T + g) is a sample of
    softmax(l/T)), each row drawing its noise from its own generator."""

    def __init__(self, generators: list[torch.Generator], temperature: float):
        self.generators, self.temperature = generators, temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, device=g.device) for g in self.generators])
        return scores.float() / self.temperature - torch.log(-torch.log(uniform.to(scores.device)))


def pad_rows(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one [N, T] tensor, padded on the right (or the left), and its mask of real tokens."""
    width = max(len(r) for r in rows)

    def padded(row: list[int], fill: list[int]) -> list[int]:
        return fill + row if left else row + fill
    ids = torch.tensor([padded(r, [pad_id] * (width - len(r))) for r in rows], dtype=torch.long)
    mask = torch.tensor([padded([1] * len(r), [0] * (width - len(r))) for r in rows], dtype=torch.long)
    return ids, mask


def up_to_first_stop(tokens: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of each row's tokens up to and including its first stop token, whether the row has one)."""
    is_stop = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()  # stop tokens strictly before each position
    return (stops_before == 0).long(), is_stop.any(-1)


@dataclass
class SampledReplies:
    prompt_ids: torch.Tensor  # [N, P] left-padded prompts (CPU)
    prompt_mask: torch.Tensor  # [N, P]
    replies: torch.Tensor  # [N, R] sampled tokens, padded after a row's stop token (CPU)
    reply_mask: torch.Tensor  # [N, R] 1 up to and including the first stop token
    finished: torch.Tensor  # [N] the reply ended with a stop token within max_new_tokens


@torch.no_grad()
def sample_replies(model: nn.Module, prompts: list[list[int]], generators: list[torch.Generator], max_new_tokens: int,
                   temperature: float, stop_ids: list[int], pad_id: int) -> SampledReplies:
    """One reply per prompt (repeat a prompt for several), sampled with HF ``generate`` (KV cache) in eval mode, reply i
    drawing its randomness from ``generators[i]`` alone: a reply does not depend on the others in its batch. Run it
    under the autocast the caller trains with."""
    prompt_ids, prompt_mask = pad_rows(prompts, pad_id, left=True)
    device = next(model.parameters()).device
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                              pad_token_id=pad_id)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                             generation_config=config,
                             logits_processor=LogitsProcessorList([GumbelSampling(generators, temperature)]))
    finally:
        model.train(was_training)
    replies = out[:, prompt_ids.shape[1]:].cpu()
    reply_mask, finished = up_to_first_stop(replies, stop_ids)
    return SampledReplies(prompt_ids, prompt_mask, replies, reply_mask, finished)
