"""Stage 4, GRPO (Shao et al. 2024) or CISPO (MiniMax-M1): reinforcement learning from rewards, no critic.

Per prompt, --num_generations replies are sampled and scored (trainer/rewards.py, + an optional reward model). Each
reply's advantage is its reward relative to its group's: A = (r − mean(r_group)) / (std(r_group) + 1e-4) (a group
whose rewards are all equal teaches nothing). Per reply token, with ratio ρ = π/π_old and the k3 estimate of
KL(π ‖ ref), KL = exp(ref − π) − (ref − π) − 1 ≥ 0:

    grpo    loss = −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) + β·KL
    cispo   loss = −sg(min(ρ, ε_high))·A·log π + β·KL          (sg: no gradient through the weight)

averaged over each reply's tokens up to its first stop token, then over replies (MiniMind's), or with
--loss_agg token over all reply tokens of the batch at once (DAPO / Dr. GRPO: long replies count by their length).
π_old is a no-grad forward over the sampled replies made exactly as the training forward (so the first ratio is 1 to
the bit); the reference is a frozen copy of the starting weights.

    python trainer/train_grpo.py                 # after train_full_sft.py (or dpo); no data or no GPU: demo-sized
    python trainer/train_grpo.py --data_path dataset/rlaif.jsonl --reward_model_path out/internlm2-1_8b-reward
"""

from __future__ import annotations

from argparse import Namespace

from trainer import Stage, parse_args, run
from trainer.grpo import GRPO, add_grpo_args, check_grpo_args
from trainer.rollout import rl_data, rl_file, rl_parser


def parse(argv: list[str] | None = None) -> Namespace:
    parser = rl_parser(__doc__, "grpo", "MiniMind-GRPO", num_generations=6)  # a group of 6 replies per prompt
    add_grpo_args(parser)
    # The demo: lr far above MiniMind's 3e-7 (tuned for its long runs), so a reward the demo SFT model can reach moves
    # within ~100 steps; replies up to 128 tokens, so that growing past the length reward's 20 characters does not
    # cut them off before their <|im_end|> (with 48, the format reward fell as the length reward rose); temperature
    # 0.7, where the demo SFT model's replies are often too short: room to learn (at 1.0 it starts near the ceiling).
    args = parse_args(parser, argv, rl_file, demo=dict(batch_size=2, num_generations=6, max_gen_len=128,
                                                       temperature=0.7, max_seq_len=128, learning_rate=3e-5,
                                                       thinking_ratio=0.0, max_steps=100, time_budget=540,
                                                       log_interval=5, save_interval=50,
                                                       rewards="length,repetition,format"))
    check_grpo_args(args)
    return args


def grpo_stage(args: Namespace) -> Stage:
    return GRPO(args).stage("grpo", rl_data)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run(grpo_stage(args), args)


if __name__ == "__main__":
    main()
