#!/usr/bin/env bash
# The two-stage pipeline in miniature, on the CPU: after scripts/demo.sh (which trains the tiny SS VAE
# in outputs/demo), export its encoder/decoder, encode SS latents, render condition views, extract tiny
# DINOv2 features, encode structured latents (with a random tiny SLat encoder: the SLat VAE is not
# trainable yet), and train the four tiny flow demos (image/text x SS/SLat) for a few steps each.
#   bash scripts/demo.sh && bash scripts/demo_flow.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DEMO_DATA:-data/demo}
VAE_RUN=${DEMO_OUT:-outputs/demo}
STEPS=${1:-50}
[ -f "$VAE_RUN/config.json" ] || { echo "run scripts/demo.sh first (no SS VAE run in $VAE_RUN)" >&2; exit 2; }
mkdir -p weights
$PY -m trellis.export --run_dir "$VAE_RUN" --model encoder --out weights/ss_enc_tiny
$PY -m trellis.export --run_dir "$VAE_RUN" --model decoder --out weights/ss_dec_tiny
$PY -m dataset_toolkits.render_cond local --output_dir "$DATA" --num_views 4 --resolution 128 --ssaa 1
$PY -m dataset_toolkits.extract_feature --output_dir "$DATA" --model tiny
$PY -m dataset_toolkits.encode_ss_latent --output_dir "$DATA" --enc_pretrained weights/ss_enc_tiny
[ -f weights/slat_enc.json ] || $PY scripts/make_tiny_slat_encoder.py --out weights/slat_enc
$PY -m dataset_toolkits.encode_latent --output_dir "$DATA" --feat_model tiny --enc_pretrained weights/slat_enc
$PY -m dataset_toolkits.stat_latent --output_dir "$DATA" --model tiny_slat_enc
$PY -m dataset_toolkits.build_metadata local --output_dir "$DATA"
for cfg in ss_flow_img_tiny ss_flow_txt_tiny slat_flow_img_tiny slat_flow_txt_tiny; do
    $PY train.py --config "configs/demo/$cfg.json" --output_dir "outputs/demo_$cfg" --data_dir "$DATA" --device cpu \
        --set trainer.args.max_steps="$STEPS" --set trainer.args.i_sample="$STEPS"
done
echo "Done: outputs/demo_{ss,slat}_flow_{img,txt}_tiny"
