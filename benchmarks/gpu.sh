#!/usr/bin/env bash
# Gemma 2 2B-shaped bfloat16 LoRA train step on one CUDA GPU (H200 reference), ours (JAX) vs
# transformers + PEFT: tokens/s and MFU against 989 TFLOP/s. About 3-5 minutes; hard limit 7.5.
#
# Installs nothing and needs no network; the environment must already hold the project, e.g.
#   pip install -e .[test] jax[cuda12]
#
# Usage: bash benchmarks/gpu.sh [extra gpu_step.py flags]
#        bash benchmarks/gpu.sh --smoke     # tiny model: runs anywhere, CPU included
# The markdown section goes to $OUT/gpu_step.md (or benchmarks/gpu_step.md without $OUT); copy it
# into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch and JAX share the GPU in one process
out="${OUT:-benchmarks}/gpu_step.md"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader || echo "no nvidia-smi: running on $(python -c 'import jax; print(jax.default_backend())')"
python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, 'cuda', torch.cuda.is_available())"

timeout 450 python benchmarks/gpu_step.py --out "$out" "$@"
echo "wrote $out"
