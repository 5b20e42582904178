#!/usr/bin/env bash
# Run as-is:   bash recipes/extract-apply.sh                       (copies the demo's tiny GRPO run first, no downloads)
# On yours:    bash recipes/extract-apply.sh BASE RUN/checkpoint-*
#
# The extract -> apply flow with every knob spelled out. Edit the variables, or override them from the
# environment (RANK=4 SCALE=1.25 bash recipes/extract-apply.sh ...).
set -euo pipefail

WORK=${WORK:-recipe-out}          # where this recipe writes (the adapter and the model go inside)
FIT=${FIT:-lsq}                   # lsq: least-squares line through the base (default); pca: RELEX rank-1
                                  #   trajectory; endpoint: the last checkpoint's delta (what ExPO/mergekit use)
RANK=${RANK:-1}                   # 1 (RLVR drift is ~rank 1), K, or an energy share such as 0.9
SVD=${SVD:-randomized}            # randomized (fast, seeded) or exact (a full SVD per matrix, for reference)
DEVICE=${DEVICE:-auto}            # auto picks cuda when present; the fit and the factorization run there
FACTOR_DTYPE=${FACTOR_DTYPE:-auto} # sketching matmuls: auto = bfloat16 where the device has it natively, else
                                  #   float32; singular values and kept energy always come from float32
MAX_MEMORY=${MAX_MEMORY:-1GiB}    # read-ahead + drift matrices awaiting factorization; speed only, never the result
SEED=${SEED:-0}                   # seeds the randomized factorization: same inputs + seed = same bytes
SCALE=${SCALE:-1.5}               # 1 = the last checkpoint; 1.5 = 50 % further along the fitted line
DTYPE=${DTYPE:-auto}              # storage dtype of the model: auto = the base's
SHARD=${SHARD:-5GB}               # largest safetensors shard of the model

if [ "$#" -eq 0 ]; then
  # No checkpoints given: the tiny GRPO run `driftmerge demo` ships (base + checkpoint-150/300/450/600).
  rm -rf "$WORK/run" && mkdir -p "$WORK"
  python -c "from pathlib import Path; from driftmerge.commands.demo import copy_run; copy_run(Path('$WORK'))"
  set -- "$WORK/run/base" "$WORK/run/checkpoint-150" "$WORK/run/checkpoint-300" "$WORK/run/checkpoint-450" \
    "$WORK/run/checkpoint-600"
fi

# 1. Fit the drift and store it as a PEFT LoRA adapter (steps are read from the checkpoint folder names;
#    add --steps 100,200,300 when the names carry none, and --base-step N when the base is not step 0).
driftmerge extract "$@" -o "$WORK/adapter" --fit "$FIT" --rank "$RANK" --svd "$SVD" --device "$DEVICE" \
  --factor-dtype "$FACTOR_DTYPE" --max-memory "$MAX_MEMORY" --seed "$SEED" --overwrite

# 2. The full model at SCALE along the drift (use --step T instead of --scale to name a training step).
driftmerge apply "$WORK/adapter" --scale "$SCALE" -o "$WORK/model" --dtype "$DTYPE" --max-shard-size "$SHARD" \
  --overwrite

# 3. Or a PEFT adapter with the scale baked into lora_alpha, for servers that load LoRA adapters.
driftmerge apply "$WORK/adapter" --scale "$SCALE" --format adapter -o "$WORK/adapter-scaled" --overwrite
