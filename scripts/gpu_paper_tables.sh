#!/usr/bin/env bash
# The paper's GPU rows in one prepared run (under 8 minutes on one H100 80GB): LLaMA2-7B architecture, bf16,
# random weights. Table 5 (time per sample, seq 512, micro-batch 2) for full fine-tuning and LoRA at
# p = 0 / 0.5 / 0.75 / 0.875 and PLD; Table 3 (max sequence length, full fine-tuning with AdamW) at p = 0 and 0.875.
#
# On the lent device machine (no internet; torch and lightning are in its image): carry the wheels made by
#   pip download --no-deps -d .gpu_wheels litgpt==0.5.13 jsonargparse==4.41.0 docstring-parser typeshed-client
# and run:  bash scripts/gpu_paper_tables.sh   (results land in $OUT, or out/gpu if OUT is unset)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! $PY -c "import litgpt, jsonargparse" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-index .gpu_wheels/*.whl
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, litgpt; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
BENCH="$PY scripts/benchmark.py --model_name Llama-2-7b-hf --precision bf16-true --device cuda"

# Table 5: time per sample (forward, backward, total), interleaved variants, medians
timeout 200 $BENCH --methods '[full]' --seq_len 512 --micro_batch_size 2 --steps 5 --warmup 2 \
  --compare_plain true --out "$OUT/table5_full.json" 2>&1 | tee "$OUT/table5_full.md"
timeout 150 $BENCH --methods '[lora]' --seq_len 512 --micro_batch_size 2 --steps 5 --warmup 2 \
  --compare_plain true --out "$OUT/table5_lora.json" 2>&1 | tee "$OUT/table5_lora.md"

# Table 3: max sequence length for full fine-tuning (AdamW step included), fixed and Bernoulli sampling
timeout 150 $BENCH --methods '[full]' --rates '[0.0, 0.875]' --find_max_seq_len true --micro_batch_size 1 \
  --optimizer_step true --max_seq_start 512 --max_seq_limit 16384 --probe_steps 2 --granularity 256 \
  --sampling fixed --out "$OUT/maxseq_fixed.json" 2>&1 | tee "$OUT/maxseq_fixed.md"
timeout 100 $BENCH --methods '[full]' --rates '[0.875]' --find_max_seq_len true --micro_batch_size 1 \
  --optimizer_step true --max_seq_start 512 --max_seq_limit 16384 --probe_steps 4 --granularity 256 \
  --sampling bernoulli --out "$OUT/maxseq_bernoulli.json" 2>&1 | tee "$OUT/maxseq_bernoulli.md"
