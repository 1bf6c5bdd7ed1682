#!/usr/bin/env bash
# The GPU check: one command that proves the accelerator path on one CUDA GPU (an H200 here),
# with no network, in under 8 minutes. Three stages, each writing to the output folder:
#   1. numerics: tiny Gemma 1/2/3 logits and PEFT LoRA gradients against transformers on the
#      GPU, float32 (benchmarks/gpu_numerics.py)                                 -> numerics.md
#   2. `run.py train` end to end on a random Gemma 2 2B-shaped model: packed 1024-token rows,
#      bfloat16, checkpoints, then the same command resumed for two more steps    -> train.log
#   3. the Gemma 2 2B-shaped LoRA step at rows of 1024 and 4096 tokens, ours against
#      transformers + PEFT (bfloat16, sdpa attention) in one process: tokens/s, MFU, peak device
#      memory, compile time (benchmarks/gpu_step.py)                              -> step.md
#
# Before, here with network: bash benchmarks/gpu_prepare.sh (fills .whl/: the wheels the GPU
# machine lacks and the tokenizer random models borrow; carry .whl with the working tree).
# Usage: bash benchmarks/gpu.sh [--smoke] [OUTDIR]     (OUTDIR: $OUT, else benchmarks/gpu_out)
#   --smoke: tiny models and rows, one numerics family; runs on a CPU (tests/test_gpu_check.py)
# The project is used from this checkout (PYTHONPATH), not installed. Exit status: non-zero when
# a stage fails; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
out="${1:-${OUT:-benchmarks/gpu_out}}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX share the GPU in one process
# the resumed run reuses what the first one compiled
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}"
py="${PYTHON:-python3}"
site="$PWD:$PWD/benchmarks"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jax_it_site .whl/*.whl && site="$site:/tmp/jax_it_site"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
tok=()
if [[ -f .whl/tokenizer.tgz ]]; then
  tar xzf .whl/tokenizer.tgz -C /tmp && tok=(model.tokenizer=/tmp/tokenizer)
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader
"$py" -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
stage() {  # name, command...: runs it, records failure, goes on
  local name=$1 t=$SECONDS; shift
  echo "== $name"
  "$@" || { echo "== $name FAILED (exit $?)"; status=1; }
  echo "== $name: $((SECONDS - t)) s"
}

if (( smoke )); then
  numerics=(--families gemma2) limits=(600 600 600)  # numerics, each train, step
  model=(--config configs/tiny.yaml report.eval_samples=1 generate.max_new_tokens=4)
  steps=(train.max_steps=2 checkpoint.every=2) more=(train.max_steps=4)
  step=(--smoke --lengths 64)
else
  numerics=() limits=(90 150 210)  # seconds: each stage's ceiling (the budget is 8 minutes)
  model=(--config configs/tiny.yaml model.path=random:gemma2-2b model.dtype=bfloat16
         model.matmul=bfloat16 model.remat=true data.max_len=1024 data.synth_train=256
         data.synth_eval=16 train.batch_size=8 train.micro_batches=1 train.loss_chunk=512
         report.eval_samples=4 generate.max_new_tokens=32)
  steps=(train.max_steps=4 checkpoint.every=2) more=(train.max_steps=6)
  step=(--lengths 1024,4096)
fi
run_dir="$(mktemp -d)/run"  # not under $out: only the log comes back
rm -f "$out/train.log"
train() {  # the same command twice: the second resumes from the first's last checkpoint
  timeout ${limits[1]} "$py" run.py "${model[@]}" "${tok[@]}" --run-dir "$run_dir" \
    --no-progress "$@" > >(tee -a "$out/train.log") 2>&1
}
resume() {
  train "${more[@]}" && grep -q "resuming from the step-" "$out/train.log" && echo "resumed: ok"
}
stage numerics timeout ${limits[0]} "$py" benchmarks/gpu_numerics.py "${numerics[@]}" \
  --out "$out/numerics.md"
stage train train "${steps[@]}"
stage resume resume
stage step timeout ${limits[2]} "$py" benchmarks/gpu_step.py "${step[@]}" --out "$out/step.md"
echo "wrote $(ls "$out" | tr '\n' ' ')to $out"
exit $status
