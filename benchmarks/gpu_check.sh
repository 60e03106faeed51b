#!/usr/bin/env bash
# The GPU check, one command (well under 10 minutes on one H100/H200): LLaMA-2-7B's configuration with random
# weights in bf16 (random:llama2-7b, the embedded SmolLM2 tokenizer), six edit modules (layers 26-31 down_proj),
# N = 1,000 / 4,000 / 8,000 simultaneous edits: the edit's stage split, seconds per 100 edits, peak GPU memory and
# the floor ratio (benchmarks/edit_speed.py); then the LLaMA-2-7B zsRE recipe's training step at TRAIN_EDITS edits
# per step on one device (benchmarks/train_step.py: stage split, work per step, matmul rate); then, when two GPUs are
# present, one 2-GPU DDP training step. ZSRE: the folder of the zsRE files (default ../shared/data/zsre).
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine; results in benchmarks/results/gpu/
#   OUT=$OUT bash benchmarks/gpu_check.sh              # the device tool: results come back from $OUT
#
# The test suite runs it on CPU at reduced size (tests/test_benchmarks.py), so it cannot rot:
#   MODEL=random:llama2-7b,num_hidden_layers=2,hidden_size=64,intermediate_size=96,num_attention_heads=4,num_key_value_heads=4 \
#   DEVICE=cpu DTYPE=float32 EDIT_MODULES=layers:0-1 N="4 8" RANK=16 TRAIN_EDITS=8 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
MODEL=${MODEL:-random:llama2-7b}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
EDIT_MODULES=${EDIT_MODULES:-layers:26-31}
N=${N:-1000 4000 8000}
RANK=${RANK:-1920}
TRAIN_EDITS=${TRAIN_EDITS:-1000}  # 0: no training step
REPEATS=${REPEATS:-2}  # each edit and floor time is the minimum over this many (the first pays cold-start costs)
ZSRE=${ZSRE:-../shared/data/zsre}
DATA=("--data.train_path" "$ZSRE/zsre_train_10k.json.gz" "--data.val_path" "$ZSRE/zsre_eval_1k.json.gz")
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
"$PY" - <<'PY' > "$OUT/environment.txt"
import torch, transformers, lightning
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "lightning", lightning.__version__)
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i), round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1), "GiB")
PY
cat "$OUT/environment.txt"
# shellcheck disable=SC2086
"$PY" benchmarks/edit_speed.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --edit-modules "$EDIT_MODULES" \
    --rank "$RANK" --data "$ZSRE/zsre_train_10k.json.gz" --n $N --repeats "$REPEATS" --out "$OUT/edit_speed.json"
"$PY" - "$OUT/edit_speed.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
print(f"{'N':>6} {'edit s':>8} {'s/100 edits':>12} {'floor s':>8} {'ratio':>6} {'peak MiB':>9}")
for row in report["results"]:
    n, total = row["n_edits"], row["edit"]["total"]
    print(f"{n:>6} {total:>8.2f} {100 * total / n:>12.3f} {row['floor']:>8.2f} {row['ratio']:>6.2f} "
          f"{row['edit_peak_memory_mb']:>9.0f}")
PY
ACCELERATOR=$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)
# the training step: 1 warm-up (FLOPs counted) + 2 timed steps, without validation
[ "$TRAIN_EDITS" -gt 0 ] && "$PY" benchmarks/train_step.py --config configs/horse_llama2_7b_zsre.yaml --warmup 1 --steps 2 \
    --out "$OUT/train_step.json" -- --model.model "$MODEL" --model.model_dtype "$DTYPE" \
    --model.edit_modules "$EDIT_MODULES" --model.rank "$RANK" --trainer.accelerator "$ACCELERATOR" \
    --data.n_edits "$TRAIN_EDITS" --data.num_workers 0 "${DATA[@]}"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$DEVICE" = cuda ] && [ "$GPUS" -ge 2 ]; then
    "$PY" train.py fit --config configs/horse_llama2_7b_zsre.yaml --model.model "$MODEL" --trainer.devices 2 \
        --trainer.strategy ddp --trainer.max_steps 1 --trainer.limit_val_batches 0 --trainer.logger false \
        --trainer.enable_checkpointing false --trainer.callbacks '[]' --data.n_edits "$TRAIN_EDITS" \
        "${DATA[@]}" \
        --trainer.default_root_dir "$OUT/ddp" 2>&1 | tail -5
else
    echo "one GPU (or CPU): the 2-GPU DDP step is skipped"
fi
