#!/usr/bin/env bash
# Run GPU benchmarks on the lent device machine in one call:
#   scripts/build_gpu_wheels.sh   (here, once)   then, on the device (carry: ["wheels"]):
#   bash benchmarks/gpu_suite.sh "<bench> [args]" ["<bench> [args]" ...]
# Each <bench> is a script in benchmarks/ given without .py; its JSON lands in $OUT/<bench>.json and
# its log in $OUT/<bench>.log. Prints the environment first, each benchmark's table last.
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
  echo "=== $name $args"
  # shellcheck disable=SC2086
  python3 "benchmarks/$name.py" --out "$OUT/$name.json" $args >"$OUT/$name.log" 2>&1
  echo "exit=$?"
  tail -n 25 "$OUT/$name.log"
done
