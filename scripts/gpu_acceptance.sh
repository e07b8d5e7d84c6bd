#!/usr/bin/env bash
# One prepared GPU acceptance run (issues 9 and 11), about 10 minutes on one H100/H200 including every model build:
#   1. Table 5: time per sample, LLaMA2-7B shape (random weights), bf16-true, seq 512, micro-batch 2, for full, lora,
#      qlora (NF4) and adapter, p = 0 / 0.5 / 0.75 / 0.875, PLD and every-branch-dropped, each beside plain litgpt
#      (the gates' overhead at p = 0), lora also beside full fine-tuning at p = 0 (its FW/BW over full's, paired by
#      round), variants in a shuffled order each round, ATen operators per step; then lora with --compile true.
#   1b. The loop's cost beyond the model: finetune/lora.py on a random checkpoint of Table 5's shape, 16 steps on
#      samples cut to 512 tokens, micro-batch = global batch = 2, p = 0.875: its fw+bw and wall time per sample
#      against benchmark.py's LoRA row at 0.875 (loop_cost.txt).
#   2. Table 3: max sequence length, full fine-tuning, AdamW, micro-batch 1, CUDA allocator capped at 80 GiB (an
#      A100 80GB; on an H100 80GB, whose 79.6 GiB are below the cap, the whole card), p = 0 / 0.5 / 0.75 / 0.875 with
#      fixed sampling and 0.875 with Bernoulli sampling; every probe in a probe process that is replaced after any
#      out-of-memory.
#   3. The four recipes (finetune/full.py, lora.py, qlora.py, adapter.py), and qlora.py --compile true, on the
#      built-in tiny model with --precision bf16-true for 20 steps: exit status, the validation loss before and
#      after training, and how many trainable tensors moved. A recipe FAILS unless it exits 0, its loss fell by at
#      least 0.05 and every trainable tensor moved; the script then exits 1 (after writing every result).
#   4. pytest -m gpu tests/test_gpu.py.
# Steps 3 and 4 run side by side; steps 1 and 2 each run alone on the card: step 2 last, after 3 and 4, so that no
# other process holds GPU memory while it searches (with them beside it, the search would count their memory as its
# own on an H100, where the cap is the whole card, and could run them out of memory).
#
# Time limits (seconds): wheels 25, imports 20, Table 5 30 + 50 + 55 + 30 + 90 (compiled), loop cost 60 + 120, the
# built-in model's check 30, the recipes (90) beside the GPU tests (120), Table 3 110 + 45: 785 in a row (the steps
# end well before their limits: about 10 minutes expected).
#
# Usage, on the GPU machine (no internet; torch and lightning in its image), wheels made as
# ../shared/gpu/README.md says, in the git-ignored .gpu_wheels/:
#   bash scripts/gpu_acceptance.sh                 # results in $OUT, else out/gpu
#   bash scripts/gpu_acceptance.sh --dry_run       # (or DRY_RUN=1) every step on the CPU with a tiny model,
#                                                  # 32-true, a few steps: checks the script itself
# At most 8 files land in the results folder: acceptance.log, table5.md, table5.json, loop_cost.txt, table3.md,
# table3.json, recipes.txt, pytest_gpu.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry_run" ]]; then DRY_RUN=1; fi
RESULTS=${OUT:-out/gpu}
mkdir -p "$RESULTS"
SCRATCH=$(mktemp -d /tmp/gpu_acceptance.XXXXXX)  # recipe outputs, per-step JSON: never in the results folder
LOG=$RESULTS/acceptance.log
for f in acceptance.log table5.md table5.json loop_cost.txt table3.md table3.json recipes.txt pytest_gpu.txt; do
  : > "$RESULTS/$f"  # a fresh run: nothing appended to an earlier run's files
done
if [[ $DRY_RUN == 1 ]]; then
  PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
  SCALE=10  # the CPU is far slower than the GPU: the dry run checks the steps, not the time limits
else
  PY=${PY:-python3}
  SCALE=1
fi
START=$SECONDS
say() { echo "[$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S OUTPUT_FILE COMMAND...: run under `timeout`, append its output to OUTPUT_FILE, log its status
step() {
  local name=$1 limit=$(($2 * SCALE)) output=$3 t0=$SECONDS status
  shift 3
  say "$name: start (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" >> "$output" 2>&1
  status=$?
  if [[ $status == 124 || $status == 137 ]]; then
    say "$name: TIMED OUT after $((SECONDS - t0))s"
  else
    say "$name: exit $status, $((SECONDS - t0))s"
  fi
  return $status
}

say "gpu_acceptance.sh, dry run: $DRY_RUN, results in $RESULTS, scratch in $SCRATCH"
say "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(git status --short 2>/dev/null | wc -l) changed files"

# --- 0. packages: the wheels into a fresh folder (never huggingface_hub: the image's transformers needs a newer one)
if [[ $DRY_RUN == 0 ]]; then
  if compgen -G ".gpu_wheels/*.whl" > /dev/null; then
    SITE=$(mktemp -d /tmp/site.XXXXXX)
    WHEELS=$(ls .gpu_wheels/*.whl | grep -v -i huggingface_hub)
    # shellcheck disable=SC2086
    step "install wheels" 25 "$LOG" "$PY" -m pip install -q --no-index --no-deps --target "$SITE" $WHEELS || exit 1
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  else
    say "no .gpu_wheels/*.whl: using the installed packages"
  fi
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$LOG"
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # as in the H200 run of Table 5 (not for Table 3)
fi

# --- the imports every step needs: stop at once if one fails (a broken import otherwise costs a whole run)
step "imports" 20 "$LOG" "$PY" -c "
import lightning, litgpt.lora, bitsandbytes
import importlib.metadata as md, torch
print('torch', torch.__version__, '| lightning', lightning.__version__, '| litgpt', md.version('litgpt'),
      '| bitsandbytes', bitsandbytes.__version__, '| cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')
assert torch.cuda.is_available() or $DRY_RUN, 'no CUDA device visible'
" || { say "STOP: an import failed (see above)"; exit 1; }

if [[ $DRY_RUN == 1 ]]; then
  MODEL=(--n_layer 2 --n_embd 64 --n_head 4 --vocab_size 1024 --device cpu --precision 32-true)
  SHAPE=(--n_layer 2 --n_embd 64 --n_head 4 --vocab_size 1024 --device cpu --precision 32-true)  # MODEL's model
  SEQ_LEN=32
  PRECISION=32-true
  T5=(--seq_len "$SEQ_LEN" --micro_batch_size 2 --steps 2 --warmup 0)
  T3=(--memory_budget 0.004 --max_seq_limit 2048 --granularity 32)
  T3_START_FIXED=32
  T3_START_BERNOULLI=256
  RECIPE=(--precision 32-true --train.max_steps 10 --train.global_batch_size 4 --train.micro_batch_size 2
          --train.lr_warmup_steps 1 --eval.max_iters 2 --eval.initial_validation true --data Builtin
          --data.num_samples 64)
  export DROPBP_GPU_TESTS_ON_CPU=1  # tests/test_gpu.py on the CPU
  COMPILED_RECIPE=lora
else
  MODEL=(--model_name Llama-2-7b-hf --device cuda --precision bf16-true)
  SHAPE=(--model_name Llama-2-7b-hf --device cuda --precision bf16-true)
  SEQ_LEN=512
  PRECISION=bf16-true
  T5=(--seq_len "$SEQ_LEN" --micro_batch_size 2 --steps 6 --warmup 1)
  T3=(--gpu_memory_gib 80 --max_seq_limit 32768 --granularity 256)
  T3_START_FIXED=2048
  T3_START_BERNOULLI=8192
  RECIPE=(--precision bf16-true --train.max_steps 20 --eval.initial_validation true)
  COMPILED_RECIPE=qlora
fi
BENCH=("$PY" scripts/benchmark.py "${MODEL[@]}")

# --- 1. Table 5, alone on the machine (timing); one process per method, so one failure costs one method
declare -A T5_LIMIT=([full]=30 [lora]=50 [qlora]=55 [adapter]=30)
declare -A T5_EXTRA=([lora]="--beside_full true")  # the headline command against full fine-tuning, paired by round
for method in full lora qlora adapter; do
  step "table 5 $method" "${T5_LIMIT[$method]}" "$RESULTS/table5.md" "${BENCH[@]}" "${T5[@]}" \
    --methods "[$method]" --compare_plain true ${T5_EXTRA[$method]:-} --out "$SCRATCH/table5_$method.json"
done
# the headline command compiled (--compile true: our branch functions; plain litgpt's blocks), beside plain litgpt
step "table 5 lora compiled" 90 "$RESULTS/table5.md" "${BENCH[@]}" "${T5[@]}" \
  --methods "[lora]" --compare_plain true --compile true --out "$SCRATCH/table5_lora_compiled.json"

# --- 1b. what the loop costs beyond the model: finetune/lora.py at Table 5's shape (random weights, samples cut to
# the sequence length, micro-batch = global batch, p = 0.875 uniform and fixed, as benchmark.py times it), alone
step "loop cost: checkpoint" 60 "$LOG" "$PY" scripts/random_checkpoint.py "${SHAPE[@]}" --out_dir "$SCRATCH/shaped" \
  --seq_len "$SEQ_LEN"
step "loop cost: lora recipe" 120 "$LOG" "$PY" finetune/lora.py --checkpoint_dir "$SCRATCH/shaped" --data JSON \
  --data.json_path "$SCRATCH/shaped/long_samples.json" --data.val_split_fraction 0.1 --train.max_seq_length "$SEQ_LEN" \
  --train.global_batch_size 2 --train.micro_batch_size 2 --train.max_steps 16 --train.log_interval 4 \
  --train.lr_warmup_steps 1 --eval.interval 1000 --eval.initial_validation false --eval.final_validation false \
  --eval.max_new_tokens 0 --dropbp.rate 0.875 --dropbp.allocation uniform --dropbp.sampling fixed \
  --precision "$PRECISION" --out_dir "$SCRATCH/loop_cost"
"$PY" - "$SCRATCH" "$RESULTS/loop_cost.txt" 2>&1 <<'EOF' | tee -a "$LOG"
import csv, json, sys
from pathlib import Path
scratch, out = Path(sys.argv[1]), Path(sys.argv[2])
try:
    row = next(r for r in json.loads((scratch / "table5_lora.json").read_text()) if r["variant"] == 0.875)
    logged = [r for p in sorted(scratch.glob("loop_cost/logs/csv/version_*/metrics.csv")) for r in csv.DictReader(open(p))]
    later = [r for r in logged if r.get("mean_step_time")][1:]  # from step 9: the first windows warm up
    samples = 2  # per optimizer step: --train.global_batch_size
    model = 1000 * sum(float(r["forward_time"]) + float(r["backward_time"]) for r in later) / len(later) / samples
    wall = 1000 * sum(float(r["mean_step_time"]) for r in later) / len(later) / samples
    bench = row["fw_ms"] + row["bw_ms"]
    text = (f"loop cost, LoRA p=0.875, ms per sample: benchmark.py fw+bw {bench:.1f}; the recipe's fw+bw {model:.1f}"
            f" ({model / bench:.2f}x), its wall time {wall:.1f} ({wall / bench:.2f}x: optimizer, data, masks"
            f" and the loop's own work add {wall - model:.1f})")
except (OSError, StopIteration, ZeroDivisionError, KeyError, ValueError) as error:
    text = f"loop cost: not measured ({type(error).__name__}: {error})"
out.write_text(text + "\n")
print(text)
EOF

# --- 3. and 4., side by side
# the built-in model once, before five recipe runs start at the same time: the four recipes, and QLoRA with
# --compile true (on the CPU of the dry run, where QLoRA refuses it, LoRA)
timeout 30 "$PY" -c "from lit_gpt.tiny_model import ensure_tiny_checkpoint; ensure_tiny_checkpoint()"
RUNS=(full lora qlora adapter "$COMPILED_RECIPE-compiled")
RECIPE_PIDS=()
for run in "${RUNS[@]}"; do
  recipe=${run%-compiled}
  extra=()
  [[ $recipe == qlora ]] && extra=(--quantize bnb.nf4)
  [[ $run == *-compiled ]] && extra+=(--compile true)
  (
    t0=$SECONDS
    timeout --kill-after=5 $((90 * SCALE)) "$PY" "finetune/$recipe.py" "${RECIPE[@]}" "${extra[@]}" \
      --dropbp.rate 0.5 --out_dir "$SCRATCH/recipe_$run" > "$SCRATCH/recipe_$run.log" 2>&1
    echo "$? $((SECONDS - t0))" > "$SCRATCH/recipe_$run.status"
  ) &
  RECIPE_PIDS+=($!)
done
say "recipes: started (limit $((90 * SCALE))s each)"
step "pytest -m gpu" 120 "$RESULTS/pytest_gpu.txt" "$PY" -m pytest -m gpu -rs -p no:cacheprovider \
  tests/test_gpu.py
wait "${RECIPE_PIDS[@]}"
RECIPES_FAILED=0
for run in "${RUNS[@]}"; do
  read -r status seconds < "$SCRATCH/recipe_$run.status"
  log_of_run=$SCRATCH/recipe_$run.log
  initial=$(grep -o "Initial evaluation | val loss: [0-9.]*" "$log_of_run" | tail -1 | grep -o "[0-9.]*$")
  loss=$(grep -o "Final evaluation | val loss: [0-9.]*" "$log_of_run" | tail -1 | grep -o "[0-9.]*$")
  moved=$(grep -o "Trainable tensors changed by training: [0-9]* of [0-9]*" "$log_of_run" | tail -1 | sed 's/.*: //')
  verdict=FAILED  # exit 0 proves nothing: the loss must fall and every trainable tensor move
  if [[ $status == 0 && -n $initial && -n $loss && -n $moved && ${moved% of *} == "${moved#* of }" ]] &&
     awk -v i="$initial" -v f="$loss" 'BEGIN { exit !(f < i - 0.05) }'; then
    verdict=learned
  fi
  echo "$run: exit $status, ${seconds}s, val loss ${initial:-none} -> ${loss:-none}, tensors moved ${moved:-none}:" \
    "$verdict" | tee -a "$RESULTS/recipes.txt"
  if [[ $verdict != learned ]]; then
    RECIPES_FAILED=$((RECIPES_FAILED + 1))
    { echo "--- last lines of $run:"; tail -n 15 "$log_of_run"; } >> "$RESULTS/recipes.txt"
  fi
done
say "recipes: $((${#RUNS[@]} - RECIPES_FAILED))/${#RUNS[@]} exited 0 and learned"

# --- 2. Table 3 (memory), last and alone on the card: the recipes and the GPU tests have ended
(
  unset PYTORCH_CUDA_ALLOC_CONF  # the default allocator, whose per-process fraction cap is the one known to hold
  step "table 3 fixed" 110 "$RESULTS/table3.md" "${BENCH[@]}" "${T3[@]}" --find_max_seq_len true \
    --methods '[full]' --rates '[0.0, 0.5, 0.75, 0.875]' --micro_batch_size 1 --probe_steps 2 --sampling fixed \
    --max_seq_start "$T3_START_FIXED" --out "$SCRATCH/table3_fixed.json"
  step "table 3 bernoulli" 45 "$RESULTS/table3.md" "${BENCH[@]}" "${T3[@]}" --find_max_seq_len true \
    --methods '[full]' --rates '[0.875]' --micro_batch_size 1 --probe_steps 4 --sampling bernoulli \
    --max_seq_start "$T3_START_BERNOULLI" --out "$SCRATCH/table3_bernoulli.json"
)

# --- merge the per-step JSON rows into one file per table
"$PY" - "$SCRATCH" "$RESULTS" 2>&1 <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
scratch, results = Path(sys.argv[1]), Path(sys.argv[2])
for table, parts in (("table5", ["table5_full", "table5_lora", "table5_qlora", "table5_adapter", "table5_lora_compiled"]),
                     ("table3", ["table3_fixed", "table3_bernoulli"])):
    rows, missing = [], []
    for part in parts:
        path = scratch / f"{part}.json"
        if path.is_file():
            rows += json.loads(path.read_text())
        else:
            missing.append(part)
    (results / f"{table}.json").write_text(json.dumps(rows, indent=2))
    print(f"{table}.json: {len(rows)} rows" + (f"; missing (failed or timed out): {', '.join(missing)}" if missing else ""))
EOF
rm -rf "$SCRATCH"
say "done in $((SECONDS - START))s; results in $RESULTS"
if [[ $RECIPES_FAILED != 0 ]]; then
  say "FAILED: $RECIPES_FAILED recipe(s) did not learn (recipes.txt)"
  exit 1
fi
