"""The agent RL stage (trainer/train_agent.py): its rewards by hand, a tool episode's layout (the tool turns are context,
never trained on), learning on a toy tool task, resume and DDP. A tiny model, CPU: the toy policy is first taught by a
few hundred steps of plain SFT to either call get_capital or answer without it, about half and half (and, sampled,
it garbles some calls); RL must learn to call, cleanly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import MiniMindConfig, MiniMindForCausalLM
from model.files import REPO_ROOT
from model.loading import load_tokenizer
from model.tools import Toolbox, assistant_turn, split_tool_calls
from model.weights import save_weights
from trainer import train
from trainer.grpo import grpo_token_loss
from trainer.rewards import REWARDS, Reply, clip_total
from trainer.rollout import generation_prompt, masked_mean
from trainer.runtime import Runtime
from trainer.train_agent import Agent, agent_stage, parse, tool_turns_tokens

ENV = {"SWANLAB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TOOLS = [{"type": "function", "function": {"name": "get_capital", "description": "The capital of a country",
                                           "parameters": {"type": "object", "properties": {"country": {"type": "string"}},
                                                          "required": ["country"]}}}]
CALL = '<tool_call>\n{"name": "get_capital", "arguments": {"country": "France"}}\n</tool_call>'
ANSWER, NO_TOOL = "The capital is Paris.", "No idea."


PROMPT_ROW = {"conversations": [{"role": "system", "content": "", "tools": json.dumps(TOOLS)},
                                {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": ""}],
              "gt": ["Paris"]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """The toy policy's weights: SFT on the two episodes (call, then answer from the tool's result; or answer without
    a call), as the rollout lays them out token by token."""
    folder = tmp_path_factory.mktemp("toy")
    from dataset.rl_dataset import RLPromptDataset

    (folder / "agent_rl.jsonl").write_text((json.dumps(PROMPT_ROW) + "\n") * 4)  # 4 rows: 4 seeds
    tok = load_tokenizer()
    row = RLPromptDataset(folder / "agent_rl.jsonl", tok, 256, cache_dir=folder)[0]
    prompt = tok(generation_prompt(tok, row, think=False), add_special_tokens=False).input_ids

    def said(text: str) -> list[int]:
        return tok(text + "<|im_end|>", add_special_tokens=False).input_ids
    paris = json.dumps({"country": "France", "country_zh": "法国", "capital": "Paris", "capital_zh": "巴黎"},
                       ensure_ascii=False)
    tool = tool_turns_tokens(tok, [{"role": "tool", "content": paris}], think=False)
    episodes = [[(prompt, 0), (said(CALL), 1), (tool, 0), (said(ANSWER), 1)], [(prompt, 0), (said(NO_TOOL), 1)]]
    rows = [([t for part, _ in e for t in part], [t if keep else -100 for part, keep in e for t in part])
            for e in episodes]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=2, vocab_size=len(tok)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    save_weights(model, folder / "toy.pth")
    return folder


def flags(toy: Path, out: Path, *more: str) -> list[str]:
    return ["--hidden_size", "32", "--num_hidden_layers", "2", "--from_weight", str(toy / "toy.pth"),
            "--device", "cpu", "--dtype", "float32", "--data_path", str(toy / "agent_rl.jsonl"), "--out_dir", str(out),
            "--batch_size", "2", "--num_generations", "4", "--max_gen_len", "40", "--max_seq_len", "256",
            "--max_total_len", "512", "--learning_rate", "1e-3", "--thinking_ratio", "0", "--log_interval", "1",
            "--max_steps", "3", "--epochs", "100", "--save_interval", "0", "--time_budget", "0", *more]


# ---------------------------------------------------------------------------------------------------------------------
# rewards


def test_tool_rewards_by_hand():
    row = {"gt": ["Paris", 42]}
    ok, bad = {"capital": "Paris"}, {"error": "unknown tool"}
    both = Reply("Paris, and 42.", True, row, [ok, ok])
    assert [REWARDS[k](both) for k in ("tool_format", "tool_count", "tool_answer", "finish")] == [0, 0.5, 2.5, 0]
    half = Reply("It is Paris.", True, row, [ok, bad])  # one valid call of two needed, one broken
    assert [REWARDS[k](half) for k in ("tool_format", "tool_count", "tool_answer", "finish")] == [-0.5, -0.5, 1.25, 0]
    stuck = Reply("<tool_call>", False, row, [ok, ok, ok])  # one call too many, still calling at the end
    assert [REWARDS[k](stuck) for k in ("tool_format", "tool_count", "tool_answer", "finish")] == [0, -0.5, 0, -0.5]
    plain = Reply("I think it is Paris, and 42.", True, row)  # no call: scored as a plain reply, as MiniMind's
    assert REWARDS["length"](plain) == 0.5 and REWARDS["tool_answer"](plain) == 0 == REWARDS["tool_count"](plain)
    assert REWARDS["length"](both) == 0  # an episode with calls: its tool rewards score it
    clipped = clip_total({"a": torch.tensor([2.5, 1.0, -2.0]), "b": torch.tensor([1.5, 0.5, -2.0])}, 3.0)
    assert clipped["clip"].tolist() == [-1.0, 0.0, 1.0] and sum(clipped.values()).tolist() == [3.0, 1.5, -3.0]


# ---------------------------------------------------------------------------------------------------------------------
# episodes


def test_an_episode_runs_the_tool_and_trains_only_the_policys_tokens(toy, tmp_path):
    from dataset.rl_dataset import RLPromptDataset

    args = parse(flags(toy, tmp_path))
    tok = load_tokenizer()
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=2, vocab_size=len(tok)))
    model.load_state_dict(torch.load(toy / "toy.pth", weights_only=True))
    agent = Agent(args)
    agent.setup(model, args)
    rows = RLPromptDataset(args.data_path, tok, args.max_seq_len, cache_dir=tmp_path)
    [[batch]] = list(agent.rollout(model, [[rows[0], rows[1]]], step=0, rt=Runtime(torch.device("cpu"),
                                                                                      torch.float32)))
    calls = batch["tool_calls"].tolist()
    assert 0 < sum(calls) < len(calls)  # the toy policy samples both kinds of episode
    width = batch["reply_mask"].shape[1]
    for i, called in enumerate(calls):
        completion = batch["input_ids"][i, -width:][batch["attention_mask"][i, -width:].bool()].tolist()
        trained = batch["reply_mask"][i, :len(completion)].tolist()
        if not called:  # one reply, all of it trained
            assert trained == [1] * len(completion) and tok.decode(completion).startswith(NO_TOOL[:2])
            continue
        # the call (trained), the tool's answer and the next turn's opening (context), the answer (trained)
        call_end = completion.index(tok.convert_tokens_to_ids("<|im_end|>")) + 1
        call = tok.decode(completion[:call_end], skip_special_tokens=True)
        tool = tool_turns_tokens(tok, Toolbox(["get_capital"]).answer(assistant_turn(*split_tool_calls(call))),
                                 think=False)
        assert completion[call_end:call_end + len(tool)] == tool and call.startswith(CALL[:30])
        assert trained == [1] * call_end + [0] * len(tool) + [1] * (len(completion) - call_end - len(tool))
        if call == CALL:
            assert '"capital": "Paris"' in tok.decode(tool) and batch["reward/tool_count"][i] == 0.5
    # the loss does not see the tool turns: log-probs there can be anything
    logps = torch.randn(batch["reply_mask"].shape)
    noise = torch.randn_like(logps) * (1 - batch["reply_mask"])
    loss = [masked_mean(grpo_token_loss(lp, batch["old_logps"], batch["ref_logps"] + n, batch["advantages"])[0],
                        batch["reply_mask"]) for lp, n in ((logps, 0), (logps + noise, noise))]
    assert loss[0] == loss[1] and (batch["reply_mask"] == 0).logical_and(batch["attention_mask"][:, -width:] == 1).any()


# ---------------------------------------------------------------------------------------------------------------------
# training runs


def test_agent_rl_learns_to_call_the_tool_and_not_with_the_sign_flipped(toy, tmp_path, monkeypatch):
    def mean_rewards(out: Path) -> tuple[float, float]:
        result = train(agent_stage(args := parse(flags(toy, out, "--max_steps", "8"))), args)
        rewards = [r["train/reward"] for r in result.history]
        return sum(rewards[:2]) / 2, sum(rewards[-2:]) / 2

    start, end = mean_rewards(tmp_path / "a")  # measured: 0.53 -> 2.27 (tool calls per episode 0.44 -> 0.88)
    assert end > 1.8 and end > start + 1.0, (start, end)
    import trainer.grpo as grpo_module
    real = grpo_module.group_advantages
    monkeypatch.setattr(grpo_module, "group_advantages", lambda r, g: (-real(r, g)[0], real(r, g)[1]))
    start_flipped, end_flipped = mean_rewards(tmp_path / "b")
    assert end_flipped < start_flipped, (start_flipped, end_flipped)  # measured: 0.10 -> -0.28 (calls fade)


def test_resume_continues_the_same_run_sampling_included(toy, tmp_path):
    from tests.test_rl import crash_at_call

    more = ("--max_steps", "4", "--save_interval", "2")
    whole = train(agent_stage(args := parse(flags(toy, tmp_path / "whole", *more))), args)
    stage = agent_stage(args := parse(flags(toy, tmp_path / "crashed", *more)))
    crash_at_call(stage, 3)  # in step 3, after the save at step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(stage, args)
    resumed = train(agent_stage(args := parse(flags(toy, tmp_path / "crashed", *more, "--from_resume", "1"))), args)
    assert [r["step"] for r in resumed.history] == [3, 4]
    for key in ("loss", "train/reward", "train/tool_calls", "train/reply_tokens"):
        assert [r[key] for r in resumed.history] == [r[key] for r in whole.history[2:]], key
    log = "agent_32_rewards.jsonl"
    assert (tmp_path / "crashed" / log).read_text() == (tmp_path / "whole" / log).read_text()
    from model.loading import load_model
    load_model("agent", hidden_size=32, num_hidden_layers=2, directory=tmp_path / "whole")  # eval_llm --weight agent


def test_ddp_two_ranks_with_half_the_prompts_equal_one_process(toy, tmp_path):
    def run(out: Path, launcher: list[str], batch_size: str) -> dict:
        cmd = [*launcher, str(REPO_ROOT / "trainer" / "train_agent.py"),
               *flags(toy, out, "--max_steps", "2", "--save_interval", "2", "--batch_size", batch_size)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, **ENV}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return torch.load(out / "agent_32_resume.pth", weights_only=True)

    two = run(tmp_path / "ddp", [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                                 "--nproc_per_node", "2"], "1")
    one = run(tmp_path / "one", [sys.executable], "2")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for k, w in one["model"].items():
        torch.testing.assert_close(two["model"][k], w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, said", [(("--max_total_len", "200"), "--max_total_len 200 leaves no room"),
                                       (("--max_turns", "0"), "--max_turns must be at least 1"),
                                       (("--num_generations", "1"), "--num_generations must be at least 2"),
                                       (("--temperature", "0"), "--temperature must be positive")])
def test_bad_flags_are_one_line(toy, tmp_path, capsys, bad, said):
    with pytest.raises(SystemExit) as stop:
        parse(flags(toy, tmp_path, *bad))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and said in err and len(err.strip().splitlines()) == 1  # no usage text
