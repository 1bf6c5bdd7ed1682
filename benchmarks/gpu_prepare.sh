#!/usr/bin/env bash
# Prepares what benchmarks/gpu.sh needs on a GPU machine that has no network, into .whl/ (git
# ignores it; it travels with the working tree): the wheels of the packages such a machine lacks
# (grain and its array-record and portpicker; rouge-score and nltk for the run's report), for its
# Python (3.12 by default), and the packaged Gemma 3 tokenizer that random models borrow, saved
# as tokenizer files (the 270M GGUF itself is too large to carry). Run it here, with network:
#   bash benchmarks/gpu_prepare.sh [PYTHON_VERSION]
# It prints the folder's size: the working tree and .whl/ together must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
rm -rf .whl && mkdir -p .whl
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
  "grain==$(python -c 'import importlib.metadata as m; print(m.version("grain"))')" \
  array-record portpicker nltk
# rouge-score is published as source only: build its pure-Python wheel here
python -m pip wheel -q --no-deps -w .whl "rouge-score==$(python -c 'import importlib.metadata as m; print(m.version("rouge-score"))')"
python - <<'PY'
import tarfile, tempfile
from jax_it import weights
from jax_it.run import setup
with tempfile.TemporaryDirectory() as d:
  weights.load_tokenizer(setup.packaged_gemma_path()).save_pretrained(d)
  with tarfile.open(".whl/tokenizer.tgz", "w:gz") as tar:
    tar.add(d, arcname="tokenizer")
PY
ls -la .whl
du -sh .whl
