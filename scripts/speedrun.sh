#!/usr/bin/env bash
# The whole pipeline in one go: pretrain -> full SFT -> LoRA -> DPO -> the eight standard prompts.
# 一条命令跑完全流程：预训练 -> 全量 SFT -> LoRA -> DPO -> 8 个标准问题自动测试。
#
#   bash scripts/speedrun.sh                                   # no data or no GPU: demo-sized stages
#   SHAPE="--preset minimind2" bash scripts/speedrun.sh        # the model shape, for every stage and the eval
#   bash scripts/speedrun.sh --use_wandb                       # extra flags go to every training stage
#
# With MiniMind's files in dataset/ (python scripts/download_data.py ...) each stage trains on them instead.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE=${SHAPE:-}
for stage in pretrain full_sft lora dpo; do
    echo "=== $stage"
    python "trainer/train_${stage}.py" $SHAPE "$@"
done
# The eval reads the checkpoints where the stages wrote them: pass it their --out_dir / --save_dir, if any.
WHERE=()
args=("$@")
for i in "${!args[@]}"; do
    case "${args[$i]}" in
        --out_dir|--save_dir) WHERE=(--out_dir "${args[$((i + 1))]}") ;;
        --out_dir=*|--save_dir=*) WHERE=(--out_dir "${args[$i]#*=}") ;;
    esac
done
echo "=== eval"
python eval_llm.py --weight full_sft --mode auto --lora_weight None $SHAPE "${WHERE[@]}" --max_new_tokens 256 < /dev/null
echo "Chat with it: python eval_llm.py --weight full_sft $SHAPE ${WHERE[*]}   (DPO: --weight dpo; LoRA: --lora_weight identity)"
