#!/usr/bin/env bash
# The README's used-by commands, in order, on the repository as workspace (CI runs this on a fresh clone).
set -euo pipefail
cd "$(dirname "$0")/.."
set -x
python -m open360.train +experiment=amber_tiny
open360 ckpt list amber_tiny
open360 ckpt lineage checkpoints/amber_tiny/step_240
dvc status checkpoints.dvc
open360 data batch --shards "$(ls -d shards/embedded_tiny-*)" --step 7 --global-batch-size 16 --decode > "${TMPDIR:-/tmp}/open360_batch_step7.txt"
open360 data verify --shards "$(ls -d shards/embedded_tiny-*)"
python -m open360.analysis.memorization run=amber_tiny sample=100
python -m open360.analysis.evaluate run=amber_tiny
open360 ckpt export amber_tiny --out release/amber_tiny --steps latest
python -m open360.train +experiment=amber_tiny_pi_base
python -m open360.analysis.long_context finetune init=checkpoints/amber_tiny_pi_base/step_2400 +experiment=amber_tiny_pi
python -m open360.analysis.long_context base=amber_tiny_pi_base finetuned=amber_tiny_pi
test -f analysis/amber_tiny/memorization/greedy-k32-l32-sample100-seed42/report.md
test -f analysis/amber_tiny/eval.md
test -f release/amber_tiny/README.md
test -f analysis/amber_tiny_pi/long_context.md
