#!/usr/bin/env bash
# Install cbtool in .venv, then run the main job offline on the embedded Fashion-MNIST sample:
# build a small ViT with Context Broadcasting, fine-tune it on CPU, evaluate it with attention density.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
out=runs/quickstart
mkdir -p "$out"
cb=.venv/bin/cbtool
$cb inject vit_tiny_patch16_224 --no-pretrained --num-classes 10 --img-size 32 \
    --model-kwargs patch_size=4 embed_dim=96 depth=4 num_heads=3 -o "$out/tiny-cb.safetensors" --force
$cb info "$out/tiny-cb.safetensors"
$cb finetune "$out/tiny-cb.safetensors" --dataset sample --epochs 10 --run-dir "$out/run" \
    -o "$out/tuned.safetensors" --force
$cb eval "$out/tuned.safetensors" --dataset sample --density --json "$out/results.json"
$cb eval "$out/tuned.safetensors" --dataset sample --corruptions noise --json "$out/robust.json" --plot "$out/robust.png"
