"""The RL stages (GRPO / CISPO): loss maths against hand-worked values, rewards, the rollout, the first ratio, learning,
resume and DDP. Tiny models, CPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.files import REPO_ROOT
from model.generation import up_to_first_stop
from model.loading import load_tokenizer
from trainer import Stage, train
from trainer.rewards import REWARDS, Reply, answer_reward, parse_rewards, repetition_reward, think_reward
from trainer.rollout import masked_mean, reply_logps, token_logps
from trainer.runtime import Runtime
from trainer.grpo import GRPO, group_advantages, grpo_token_loss, k3_kl
from trainer.train_grpo import grpo_stage, parse

ENV = {"SWANLAB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_prompts(path: Path, n: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"conversations": [{"role": "user", "content": f"Question {i}: say something."},
                               {"role": "assistant", "content": "无"}], **({"gt": str(i)} if i % 2 else {})}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_flags(tmp_path: Path, *flags: str) -> list[str]:
    """A 2-layer, 32-wide fp32 CPU GRPO run from random weights, logging every step; later flags win. Replies of 8
    random tokens are 20 characters or not: the length reward has a spread to learn from."""
    return ["--hidden_size", "32", "--num_hidden_layers", "2", "--from_weight", "none", "--device", "cpu",
            "--dtype", "float32", "--data_path", str(write_prompts(tmp_path / "rl.jsonl")), "--out_dir",
            str(tmp_path / "out"), "--batch_size", "2", "--num_generations", "4", "--max_gen_len", "8",
            "--max_seq_len", "64", "--learning_rate", "1e-3", "--thinking_ratio", "0.5", "--log_interval", "1",
            "--max_steps", "4", "--epochs", "10", "--save_interval", "0", "--time_budget", "0",
            "--rewards", "length,repetition,format", "--temperature", "1.0", *flags]


# ---------------------------------------------------------------------------------------------------------------------
# maths


def test_group_advantages_by_hand():
    adv, skipped = group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), group_size=3)
    s = 1 / (1 + 1e-4)  # group 1: mean 2, unbiased std 1; group 2: all equal, so nothing to learn
    torch.testing.assert_close(adv, torch.tensor([-s, 0.0, s, 0.0, 0.0, 0.0]))
    assert skipped == 0


def test_a_nan_reward_is_skipped_not_spread():
    adv, skipped = group_advantages(torch.tensor([1.0, float("nan"), 3.0, 0.0]), group_size=4)
    # the NaN reply gets advantage 0; the others: mean 4/3, std of (1, 3, 0)
    rest = torch.tensor([1.0, 3.0, 0.0])
    expected = (rest - rest.mean()) / (rest.std() + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([expected[0], 0.0, expected[1], expected[2]]))
    assert skipped == 1


def test_k3_kl_is_nonnegative_and_zero_at_the_reference():
    logps, ref = torch.randn(4, 7), torch.randn(4, 7)
    assert (k3_kl(logps, ref) >= 0).all()
    assert torch.equal(k3_kl(logps, logps), torch.zeros(4, 7))
    # by hand: ref − π = ln 2 -> 2 − ln 2 − 1
    torch.testing.assert_close(k3_kl(torch.tensor([0.0]), torch.tensor([0.6931471805599453])),
                               torch.tensor([1 - 0.6931471805599453]))


def test_grpo_token_loss_by_hand():
    ratio = torch.tensor([[1.5, 0.5, 1.1]])
    old = torch.zeros(1, 3)
    logps = ratio.log()
    for a, expected in [(1.0, [-1.2, -0.5, -1.1]), (-1.0, [1.5, 0.8, 1.1])]:
        # A > 0: min(ρA, clip(ρ)A) takes the clipped 1.2 and the unclipped 0.5; A < 0: the unclipped 1.5, clipped 0.8
        loss, r, kl = grpo_token_loss(logps, old, logps, torch.tensor([a]), "grpo", epsilon=0.2, beta=0.1)
        torch.testing.assert_close(loss, torch.tensor([expected]))
        torch.testing.assert_close(r, ratio)
        assert torch.equal(kl, torch.zeros(1, 3))


def test_cispo_weight_is_clipped_above_and_detached():
    logps = torch.tensor([[0.0, 2.0]], requires_grad=True)  # ratios 1 and e² ≈ 7.4 against old log-probs 0
    ref = torch.tensor([[0.0, 2.0]])
    loss, _, _ = grpo_token_loss(logps, torch.zeros(1, 2), ref, torch.tensor([2.0]), "cispo", epsilon_high=5.0,
                                 beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([[-0.0, -2 * 5.0 * 2.0]]))  # −sg(min(ρ, 5))·A·log π
    loss.sum().backward()
    # the gradient flows through log π only: −min(ρ, 5)·A (the KL term's gradient is 0 where π = ref)
    torch.testing.assert_close(logps.grad, torch.tensor([[-2.0, -10.0]]))


def test_sequence_and_token_means_by_hand():
    values = torch.tensor([[1.0, 3.0, 100.0], [4.0, 4.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # the first reply stopped after 2 tokens
    assert masked_mean(values, mask).item() == pytest.approx((2 + 4) / 2)
    assert masked_mean(values, mask, per_sequence=False).item() == pytest.approx((1 + 3 + 12) / 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_logps_equal_one_piece_and_keep_no_whole_float32_copy(dtype):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 300, dtype=dtype, requires_grad=True)  # 5 replies of 7 tokens, a vocabulary of 300
    targets, weights = torch.randint(0, 300, (5, 7)), torch.randn(5, 7)
    scaled = logits.float() / 0.7
    whole = scaled.gather(-1, targets[..., None]).squeeze(-1) - scaled.logsumexp(-1)
    (whole_grad,) = torch.autograd.grad((whole * weights).sum(), logits)
    saved = []  # what autograd keeps for the backward pass
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked = token_logps(logits, targets, 0.7, rows=2)
    (chunked_grad,) = torch.autograd.grad((chunked * weights).sum(), logits)
    assert torch.equal(chunked, whole) and torch.equal(chunked_grad, whole_grad)  # to the bit
    assert max(saved) <= 2 * 7 * 300  # one chunk of 2 replies at most (one piece keeps the whole scaled copy)
    with torch.no_grad():
        assert torch.equal(token_logps(logits, targets, 0.7), whole)


def test_reply_mask_runs_to_the_first_stop_token():
    mask, finished = up_to_first_stop(torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9]]), [2, 0])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] and finished.tolist() == [True, False]


# ---------------------------------------------------------------------------------------------------------------------
# rewards


def test_rule_rewards_by_hand():
    assert REWARDS["length"](Reply("short", True)) == -0.5
    assert REWARDS["length"](Reply("x" * 20, True)) == 0.5
    assert think_reward(Reply("no think block here", True)) == 0.0
    assert think_reward(Reply("t" * 25 + "</think>answer", True)) == 1.25
    assert think_reward(Reply("tiny</think>a</think>b", True)) == -0.75
    assert repetition_reward(Reply("a b c d e f", True)) == 0.0
    assert repetition_reward(Reply("la la la la la la", True)) == -0.5  # 3 of 4 trigrams repeat: capped at 0.5
    assert REWARDS["format"](Reply("", False)) == -0.5 and REWARDS["format"](Reply("", True)) == 0.5
    with pytest.raises(ValueError, match="unknown reward nope"):
        parse_rewards("length,nope")


def test_answer_reward_matches_numbers_text_and_facts():
    assert answer_reward(Reply("<think>2+2</think>The answer is 4.", True, {"gt": "4"})) == 1.0
    assert answer_reward(Reply("It is 1,000 or 5", True, {"gt": 1000})) == 0.0  # the last number is the answer
    assert answer_reward(Reply("It is 5, no: 1,000", True, {"gt": 1000})) == 1.0
    assert answer_reward(Reply("Paris.", True, {"gt": "paris"})) == 1.0
    assert answer_reward(Reply("Paris is big", True, {"gt": "paris"})) == 0.0
    assert answer_reward(Reply("sunny, 25 degrees", True, {"gt": ["sunny", "25.0", "rain"]})) == pytest.approx(2 / 3)
    assert answer_reward(Reply("anything", True, {})) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# the rollout and the first update


def grpo_with_model(tmp_path: Path, *flags: str) -> tuple[GRPO, torch.nn.Module, list[dict]]:
    from model import MiniMindConfig, MiniMindForCausalLM
    from dataset.rl_dataset import RLPromptDataset

    args = parse(tiny_flags(tmp_path, *flags))
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(hidden_size=32, num_hidden_layers=2, vocab_size=len(tokenizer)))
    grpo = GRPO(args)
    grpo.setup(model, args)
    rows = RLPromptDataset(args.data_path, tokenizer, args.max_seq_len)
    return grpo, model, [rows[i] for i in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_first_ratio_is_exactly_one(tmp_path, dtype):
    grpo, model, rows = grpo_with_model(tmp_path)
    rt = Runtime(torch.device("cpu"), dtype)
    [[batch]] = list(grpo.rollout(model, [rows], step=0, rt=rt))
    assert batch["input_ids"].shape[0] == 3 * 4
    with rt.autocast():  # as the engine calls the loss: grad on, train mode, autocast
        logps = reply_logps(model, batch)[0]
        _, metrics = grpo(model, batch)
    assert torch.equal(logps, batch["old_logps"])  # ratio exp(π − π_old) == 1 to the bit
    assert torch.equal(batch["ref_logps"], batch["old_logps"])  # and the reference is the policy: KL 0
    assert metrics["kl"].item() == 0 and metrics["clip_frac"].item() == 0


def test_replies_depend_on_the_row_not_on_the_batch(tmp_path):
    grpo, model, rows = grpo_with_model(tmp_path)
    rt = Runtime(torch.device("cpu"), torch.float32)
    together = grpo.rollouts.sample(model, rows, step=3, rt=rt)
    alone = grpo.rollouts.sample(model, rows[1:2], step=3, rt=rt)
    n = alone["reply_mask"].shape[1]
    mine = together["input_ids"][4:8, -together["reply_mask"].shape[1]:][:, :n]
    assert torch.equal(mine * alone["reply_mask"], alone["input_ids"][:, -n:] * alone["reply_mask"])
    again = grpo.rollouts.sample(model, rows, step=4, rt=rt)  # another step samples anew
    assert not torch.equal(again["input_ids"], together["input_ids"])


# ---------------------------------------------------------------------------------------------------------------------
# training runs


def test_grpo_learns_a_reachable_reward_and_not_with_the_sign_flipped(tmp_path, monkeypatch):
    # reward: the share of the reply's characters that are ASCII letters (random weights: ~0.3 at the start)
    monkeypatch.setitem(REWARDS, "letters", lambda r: sum(c.isascii() and c.isalpha() for c in r.text) /
                        max(1, len(r.text)))
    # one token per reply, a high lr: from random weights the policy concentrates on rewarded tokens within ~10 steps
    flags = ("--rewards", "letters", "--max_steps", "15", "--epochs", "100", "--learning_rate", "0.1",
             "--num_generations", "16", "--loss_type", "grpo", "--beta", "0", "--max_gen_len", "1")

    def mean_rewards() -> tuple[float, float]:
        result = train(grpo_stage(args := parse(tiny_flags(tmp_path, *flags))), args)
        rewards = [r["train/reward"] for r in result.history]
        return sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5

    start, end = mean_rewards()  # measured: 0.36 -> 1.00
    assert end > 0.9 and end > start + 0.3, (start, end)
    import trainer.grpo as grpo_module
    real = grpo_module.group_advantages
    monkeypatch.setattr(grpo_module, "group_advantages", lambda r, g: (-real(r, g)[0], real(r, g)[1]))
    start_flipped, end_flipped = mean_rewards()
    assert end_flipped < start_flipped, (start_flipped, end_flipped)  # a sign error unlearns (measured: 0.36 -> 0.00)


def crash_at_call(stage: Stage, n: int) -> None:
    """Make the stage's loss raise at its n-th call."""
    real_loss, calls = stage.loss_fn, 0

    def crashing_loss(model, batch):
        nonlocal calls
        calls += 1
        if calls == n:
            raise RuntimeError("simulated crash")
        return real_loss(model, batch)
    stage.loss_fn = crashing_loss


def test_resume_continues_the_same_run_sampling_included(tmp_path):
    flags = ("--max_steps", "4", "--save_interval", "2")
    whole = train(grpo_stage(args := parse(tiny_flags(tmp_path / "whole", *flags))), args)
    crashed = tmp_path / "crashed"
    stage = grpo_stage(args := parse(tiny_flags(crashed, *flags)))
    crash_at_call(stage, 3)  # in step 3, after the save at step 2
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(stage, args)
    resumed = train(grpo_stage(args := parse(tiny_flags(crashed, *flags, "--from_resume", "1"))), args)
    assert [r["step"] for r in resumed.history] == [3, 4]
    for key in ("loss", "train/reward", "train/reply_tokens"):
        assert [r[key] for r in resumed.history] == [r[key] for r in whole.history[2:]], key
    from model.loading import load_model
    load_model("grpo", hidden_size=32, num_hidden_layers=2, directory=crashed / "out")  # eval_llm.py --weight grpo
    rewards_log = "out/grpo_32_rewards.jsonl"  # the crashed step's line is replaced by the resumed run's
    assert (crashed / rewards_log).read_text() == (tmp_path / "whole" / rewards_log).read_text()
    wa = torch.load(tmp_path / "whole" / "out" / "grpo_32_resume.pth", weights_only=True)["model"]
    wb = torch.load(crashed / "out" / "grpo_32_resume.pth", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def script_run(tmp_path: Path, launcher: list[str], script: str, *flags: str) -> dict:
    cmd = [*launcher, str(REPO_ROOT / "trainer" / script), *tiny_flags(tmp_path, "--max_steps", "2", *flags)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(next((tmp_path / "out").glob("*_resume.pth")), weights_only=True)


@pytest.mark.parametrize("script, one_flags, rank_flags", [
    ("train_grpo.py", ["--batch_size", "2"], ["--batch_size", "1"]),
    # PPO: 4 prompts in mini-batches of 2 = 2 ranks of 2 prompts in mini-batches of 1 (rank r holds rows r, r+2)
    ("train_ppo.py", ["--batch_size", "4", "--mini_batch_size", "2"], ["--batch_size", "2", "--mini_batch_size", "1"]),
])
def test_ddp_two_ranks_with_half_the_prompts_equal_one_process(tmp_path, script, one_flags, rank_flags):
    common = ["--save_interval", "2"] + (["--save_weight", "ppo_actor", "--num_generations", "1",
                                          "--critic_learning_rate", "1e-2"] if "ppo" in script else [])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    two = script_run(tmp_path / "ddp", [torchrun, "--standalone", "--nproc_per_node", "2"], script, *common,
                     *rank_flags)
    one = script_run(tmp_path / "one", [sys.executable], script, *common, *one_flags)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for k, w in one["model"].items():
        torch.testing.assert_close(two["model"][k], w, rtol=1e-4, atol=1e-5)  # as the engine's DDP test


# ---------------------------------------------------------------------------------------------------------------------
# PPO


def test_gae_by_hand():
    from trainer.train_ppo import gae

    rewards, values = torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[0.5, 0.8, 7.0]])
    mask = torch.tensor([[1, 1, 0]])  # the reply ended after 2 tokens: the third entry is padding
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # t=1: δ = 1 + 0 − 0.8 = 0.2; t=0: δ = 0 + 0.8 − 0.5 = 0.3, A = 0.3 + 0.95·0.2 = 0.49
    torch.testing.assert_close(adv, torch.tensor([[0.49, 0.2, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.99, 1.0, 0.0]]))
    adv, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)  # t=0: 0 + 0.5·0.8 − 0.5 + 0.5·0.2 = 0.0
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.2, 0.0]]))


def test_clipped_value_loss_by_hand():
    from trainer.train_ppo import clipped_value_loss

    # V moved 0.5 -> 1.0 towards R = 2: the clipped V (0.7) is further from R, and max takes it: ½·1.3² = 0.845
    loss = clipped_value_loss(torch.tensor([1.0, 0.6]), torch.tensor([0.5, 0.5]), torch.tensor([2.0, 2.0]), 0.2)
    torch.testing.assert_close(loss, torch.tensor([0.845, 0.5 * 1.4 ** 2]))


def test_the_critic_gradient_does_not_shrink_the_actor_step():
    from trainer.step import optimizer_step

    # PPO's two parameter groups (actor, critic) are clipped apart, as MiniMind's two optimizers: clipped together, the
    # critic's large early gradient (norm 10 here) would scale the actor's step by 1/10
    actor, critic = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    actor.grad, critic.grad = torch.tensor([0.3, 0.4]), torch.tensor([6.0, 8.0])  # norms 0.5 and 10
    optimizer = torch.optim.SGD([{"params": [actor]}, {"params": [critic]}], lr=1.0)
    norm = optimizer_step([actor, critic], optimizer, torch.amp.GradScaler("cpu", enabled=False), grad_clip=1.0)
    assert norm.item() == pytest.approx((0.5 ** 2 + 10 ** 2) ** 0.5)  # the norm before clipping, of both
    torch.testing.assert_close(actor.detach(), torch.tensor([-0.3, -0.4]))  # under the clip: a full step
    torch.testing.assert_close(critic.detach(), torch.tensor([-0.6, -0.8]), rtol=1e-5, atol=1e-6)  # clipped to 1


def ppo_flags(tmp_path: Path, *flags: str) -> list[str]:
    return tiny_flags(tmp_path, "--save_weight", "ppo_actor", "--num_generations", "1", "--batch_size", "4",
                      "--mini_batch_size", "2", "--critic_learning_rate", "1e-2", *flags)


def test_ppo_first_ratio_is_one_and_the_critic_is_saved_and_resumed(tmp_path):
    from trainer.train_ppo import PPO, ppo_stage, parse as parse_ppo

    args = parse_ppo(ppo_flags(tmp_path))
    ppo = PPO(args)
    grpo, model, rows = grpo_with_model(tmp_path)
    ppo.setup(model, args)
    rt = Runtime(torch.device("cpu"), torch.bfloat16)
    first = next(iter(ppo.rollout(model, [rows], step=0, rt=rt)))[0]
    with rt.autocast():
        assert torch.equal(reply_logps(model, first)[0], first["old_logps"])  # ratio exactly 1 under autocast
        assert torch.equal(model.critic(first), first["old_values"])
    # resume: 2 steps, crash in step 3, resume == 4 uninterrupted (critic included)
    flags = ("--max_steps", "4", "--save_interval", "2")
    whole = train(ppo_stage(a := parse_ppo(ppo_flags(tmp_path / "whole", *flags))), a)
    stage = ppo_stage(a := parse_ppo(ppo_flags(tmp_path / "crashed", *flags)))
    crash_at_call(stage, 9)  # in step 3: 2 passes x 2 mini-batches = 4 loss calls a step
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(stage, a)
    resumed = train(ppo_stage(a := parse_ppo(ppo_flags(tmp_path / "crashed", *flags, "--from_resume", "1"))), a)
    for key in ("loss", "train/value_loss", "train/reward"):
        assert [r[key] for r in resumed.history] == [r[key] for r in whole.history[2:]], key
    out = tmp_path / "whole" / "out"
    state = torch.load(out / "ppo_actor_32_resume.pth", weights_only=True)["model"]
    assert any(k.startswith("critic.") for k in state)
    actor, critic = (torch.load(out / f"ppo_{part}_32.pth", weights_only=True) for part in ("actor", "critic"))
    assert not any(k.startswith("critic.") for k in actor) and "value_head.weight" in critic
    from model.loading import load_model
    load_model("ppo_actor", hidden_size=32, num_hidden_layers=2, directory=out)  # eval_llm.py --weight ppo_actor
    assert whole.history[-1]["train/value_loss"] < whole.history[0]["train/value_loss"]  # the critic learns


# ---------------------------------------------------------------------------------------------------------------------
# reward model, bad input


def tiny_reward_model(folder: Path, num_labels: int = 1) -> Path:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=num_labels, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_local_reward_model_scores_each_reply(tmp_path):
    from trainer.rewards import RewardModel

    model = RewardModel(str(tiny_reward_model(tmp_path / "rm")), clip=3.0)
    row = {"messages": [{"role": "user", "content": "hi"}]}
    scores = model([Reply("hello there", True, row), Reply("完全不同的回答", True, row), Reply("hello there", True, row)])
    assert all(abs(s) <= 3.0 for s in scores) and scores[0] == pytest.approx(scores[2]) and scores[0] != scores[1]
    grpo, policy, rows = grpo_with_model(tmp_path, "--reward_model_path", str(tmp_path / "rm"))
    batch = grpo.rollouts.sample(policy, rows, step=0, rt=Runtime(torch.device("cpu"), torch.float32))
    assert batch["reward/reward_model"].shape == (12,) and torch.isfinite(batch["reward/reward_model"]).all()


REMOTE_CODE = """
import torch
from transformers import PretrainedConfig, PreTrainedModel


class TinyRewardConfig(PretrainedConfig):
    model_type = "tiny_reward"


class TinyReward(PreTrainedModel):
    config_class = TinyRewardConfig

    def __init__(self, config):
        super().__init__(config)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.post_init()

    def get_score(self, tokenizer, messages):  # InternLM2-reward's interface: a chat in, a float out
        reply = messages[-1]["content"]
        if reply == "NaN please":
            return float("nan")
        return (self.scale * len(tokenizer(reply).input_ids) - 4).item()
"""


def remote_reward_model(folder: Path, scale: float) -> Path:
    """A trust_remote_code reward model folder, InternLM2-reward style: config.json's auto_map names the model class in
    a .py file beside it, which has get_score(tokenizer, messages); score = scale x the reply's tokens - 4."""
    folder.mkdir(parents=True)
    (folder / "modeling_tiny_reward.py").write_text(REMOTE_CODE)
    auto_map = {"AutoConfig": "modeling_tiny_reward.TinyRewardConfig", "AutoModel": "modeling_tiny_reward.TinyReward"}
    (folder / "config.json").write_text(json.dumps({"model_type": "tiny_reward", "architectures": ["TinyReward"],
                                                    "auto_map": auto_map}))
    from safetensors.torch import save_file
    save_file({"scale": torch.tensor(scale)}, folder / "model.safetensors")  # a weight that must load
    load_tokenizer().save_pretrained(folder)
    return folder


def test_an_internlm2_style_reward_model_scores_through_get_score_clipped(tmp_path):
    from trainer.rewards import RewardModel

    model = RewardModel(str(remote_reward_model(tmp_path / "rm", scale=2.0)), clip=3.0)  # offline, trust_remote_code
    tokens = len(model.tokenizer("ab").input_ids)
    row = {"messages": [{"role": "user", "content": "hi"}]}
    scores = model([Reply("ab", True, row), Reply("a long reply of many tokens", True, row),
                    Reply("<think>reasoning</think>NaN please", True, row)])
    assert scores[0] == pytest.approx(max(-3.0, 2.0 * tokens - 4))  # the saved scale (2), not the initial 1
    assert scores[1] == 3.0  # clipped to +3
    assert math.isnan(scores[2])  # scored on the answer after </think>; a NaN stays NaN (no clip to +3)


def test_a_bad_reward_model_folder_is_one_clear_line(tmp_path):
    from trainer.rewards import RewardModel

    with pytest.raises(FileNotFoundError, match="no config.json"):
        RewardModel(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="3 labels"):
        RewardModel(str(tiny_reward_model(tmp_path / "cls", num_labels=3)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(FileNotFoundError, match="cannot load a reward model"):
        RewardModel(str(tmp_path / "broken"))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "trainer" / "train_grpo.py"),
                           *tiny_flags(tmp_path, "--reward_model_path", str(tmp_path / "broken"))],
                          cwd=REPO_ROOT, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "cannot load a reward model" in proc.stderr


def test_a_nan_reward_is_counted_and_a_long_prompt_keeps_its_end(tmp_path, monkeypatch):
    monkeypatch.setitem(REWARDS, "sometimes_nan", lambda r: float("nan") if len(r.text) % 2 else 1.0)
    grpo, model, rows = grpo_with_model(tmp_path, "--rewards", "length,sometimes_nan", "--max_seq_len", "12")
    [[batch]] = list(grpo.rollout(model, [rows], step=0, rt=Runtime(torch.device("cpu"), torch.float32)))
    assert batch["reward_skipped"] > 0 and torch.isfinite(batch["advantages"]).all()
    assert batch["prompt_truncated"].all()  # every prompt is over 12 tokens: cut to its last 12, counted
    assert (batch["attention_mask"].sum(-1) - batch["reply_mask"].sum(-1) == 12).all()
    loss, metrics = grpo(model, batch)
    assert torch.isfinite(loss) and metrics["prompt_truncated"] == 1


def test_rl_memory_measures_its_grpo_child_with_flags_grpo_accepts(tmp_path):
    from argparse import Namespace

    from scripts.rl_memory import grpo_flags, peak_rss_gib

    wanted = Namespace(preset="minimind2-small", batch_size=2, num_generations=6, max_gen_len=512,
                       reward_model=tmp_path / "rm")
    args = parse(grpo_flags(wanted, tmp_path / "out", ["--beta", "0"]))  # the demo defaults must not replace them
    assert (args.batch_size, args.num_generations, args.max_gen_len, args.max_steps, args.reward_dtype, args.beta,
            args.reward_model_path) == (2, 6, 512, 1, "bfloat16", 0.0, str(tmp_path / "rm"))
    assert peak_rss_gib([sys.executable, "-c", "b = b'x' * (400 << 20)"]) > 400 / 1024  # the child's peak
    with pytest.raises(SystemExit, match="failed"):
        peak_rss_gib([sys.executable, "-c", "raise SystemExit(3)"])


def test_eval_llm_names_the_rl_scripts_for_a_missing_checkpoint(tmp_path):
    import runpy

    main = runpy.run_path(str(REPO_ROOT / "eval_llm.py"))["main"]
    for stage, script in (("grpo", "train_grpo.py"), ("ppo_actor", "train_ppo.py")):
        with pytest.raises(SystemExit) as exit:
            main(["--weight", stage, "--out_dir", str(tmp_path)])
        assert f"python trainer/{script}" in str(exit.value.code)


def test_the_reward_curve_plots_from_the_log(tmp_path):
    from scripts.plot_rewards import main as plot_main, moving_average

    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    log = tmp_path / "grpo_32_rewards.jsonl"
    log.write_text("".join(json.dumps({"step": s, "reward": s / 10, "reward/length": s / 20}) + "\n" for s in range(1, 6)))
    plot_main([str(log), "--smooth", "2"])
    assert (tmp_path / "grpo_32_rewards.png").stat().st_size > 1000
    log.write_text("{oops\n")
    with pytest.raises(SystemExit, match="grpo_32_rewards.jsonl:1 is not a JSON line"):
        plot_main([str(log)])
