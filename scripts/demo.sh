#!/usr/bin/env bash
# The demo: installs everything into .venv, builds a small dataset with the dataset toolkit from the
# assets shipped in assets/demo, and trains a tiny sparse-structure VAE on the CPU. Checkpoints,
# TensorBoard logs and snapshot images land in outputs/demo. Re-running resumes (and finishes at once
# when the run is complete); delete outputs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
DATA=${DEMO_DATA:-data/demo}
OUT=${DEMO_OUT:-outputs/demo}
$PY -m dataset_toolkits.build_metadata local --input assets/demo --output_dir "$DATA"
$PY -m dataset_toolkits.render local --output_dir "$DATA" --num_views 8 --resolution 128
$PY -m dataset_toolkits.voxelize local --output_dir "$DATA"
$PY train.py --config configs/demo/ss_vae_tiny.json --output_dir "$OUT" --data_dir "$DATA" --device cpu "$@"
echo
echo "Done. Snapshots: $OUT/samples/   TensorBoard: .venv/bin/tensorboard --logdir $OUT/tb_logs"
