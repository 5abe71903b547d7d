#!/usr/bin/env bash
# The whole pipeline in one go: pretrain -> full SFT -> LoRA -> DPO -> GRPO -> tool-call SFT -> agent RL ->
# distillation -> the eight standard prompts.
# 一条命令跑完全流程：预训练 -> 全量 SFT -> LoRA -> DPO -> GRPO -> 工具调用 SFT -> Agent RL -> 知识蒸馏 -> 8 个标准问题自动测试。
#
#   bash scripts/speedrun.sh                                   # no data or no GPU: demo-sized stages
#   SHAPE="--preset minimind2" bash scripts/speedrun.sh        # the model shape, for every stage and the eval
#   bash scripts/speedrun.sh --use_wandb                       # extra flags go to every training stage
#   DISTILL="--hidden_size 384 --from_weight none" bash scripts/speedrun.sh   # the distillation student's flags
#
# With MiniMind's files in dataset/ (python scripts/download_data.py ...) each stage trains on them instead.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE=${SHAPE:-}
for stage in pretrain full_sft lora dpo grpo; do
    echo "=== $stage"
    python "trainer/train_${stage}.py" $SHAPE "$@"
done
# Tool use: SFT on the bundled tool rows (the demo SFT data has none; MiniMind's sft_t2t files do), then RL over
# multi-turn tool episodes from it.
echo "=== tool-call SFT"
python trainer/train_full_sft.py --data_path dataset/demo/sft_tools.jsonl --from_weight full_sft \
    --save_weight full_sft_tools --max_seq_len 1024 $SHAPE "$@"
echo "=== agent RL"
python trainer/train_agent.py --from_weight full_sft_tools $SHAPE "$@"
# Distillation: the full-SFT model above is the teacher, so SHAPE's size flags become --teacher_* flags; the student
# is the script's own (demo: half the width and layers, from random weights; MiniMind's recipe: --from_weight full_sft
# at --hidden_size, 512 by default), or what DISTILL says.
DISTILL=${DISTILL:-}
TEACHER=$(printf '%s' "$SHAPE" | sed -E 's/--(preset|hidden_size|num_hidden_layers|use_moe)([ =]|$)/--teacher_\1\2/g')
echo "=== distillation"
python trainer/train_distillation.py $TEACHER $DISTILL "$@"
# The eval reads the checkpoints where the stages wrote them: pass it their --out_dir / --save_dir, if any.
# (Written for bash 3.2 too, macOS's: no empty-array expansion under set -u.)
WHERE=""
previous=""
for arg in "$@"; do
    case "$previous" in --out_dir|--save_dir) WHERE="$arg" ;; esac
    case "$arg" in --out_dir=*|--save_dir=*) WHERE="${arg#*=}" ;; esac
    previous="$arg"
done
echo "=== eval"
python eval_llm.py --weight full_sft --mode auto --lora_weight None $SHAPE ${WHERE:+--out_dir "$WHERE"} \
    --max_new_tokens 256 < /dev/null
echo "Chat with it: python eval_llm.py --weight full_sft${SHAPE:+ $SHAPE}${WHERE:+ --out_dir $WHERE}   (DPO: --weight dpo; GRPO: --weight grpo; agent RL: --weight agent, and python scripts/eval_toolcall.py --weight agent; distilled: --weight full_dist; LoRA: --lora_weight identity)"
