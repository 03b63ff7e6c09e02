#!/usr/bin/env bash
# Run GPU benchmarks on the lent device machine in one call:
#   scripts/build_gpu_wheels.sh   (here, once)   then, on the device (carry: ["wheels"]):
#   bash benchmarks/gpu_suite.sh "<bench> [args]" ["<bench> [args]" ...]
# Each <bench> is a script in benchmarks/ given without .py; its JSON lands in $OUT/<bench>.json and
# its log in $OUT/<bench>.log (<bench>.2.json, ... when a benchmark is given more than once). Prints
# the environment first, each benchmark's table last.
set -uo pipefail
OUT=${OUT:-/tmp/open360-bench}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --find-links wheels hydra-core omegaconf datasketch megatron-core 2>&1 | tail -2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} | tee "$OUT/env.txt"
for spec in "$@"; do
  name=${spec%% *}
  args=""
  [[ "$spec" == *" "* ]] && args=${spec#* }
  base="$OUT/$name"
  n=2
  while [[ -e "$base.json" || -e "$base.log" ]]; do  # the same benchmark twice: keep both results
    base="$OUT/$name.$n"
    n=$((n + 1))
  done
  echo "=== $name $args -> $base.json"
  # shellcheck disable=SC2086
  python3 "benchmarks/$name.py" --out "$base.json" $args >"$base.log" 2>&1
  echo "exit=$?"
  tail -n 25 "$base.log"
done
