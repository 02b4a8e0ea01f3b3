#!/usr/bin/env bash
# Regenerate the pictures in docs/img/ with `flowserve train` and `flowserve plot`.
# Run from the repository root after scripts/setup.sh; takes a few CPU-minutes.
set -euo pipefail
flowserve=".venv/bin/flowserve"
out="docs/img"
ckpt="checkpoints/plots"
mkdir -p "$out" "$ckpt"

for spec in realnvp:moons maf:8gaussians glow:circles iaf:checkerboard; do
  family=${spec%%:*} dataset=${spec##*:}
  "$flowserve" train --family "$family" --dataset "$dataset" --steps 2000 -o "$ckpt/$family-$dataset.pt"
  "$flowserve" plot "$ckpt/$family-$dataset.pt" -o "$out/$family-$dataset.png"
done

"$flowserve" train --family realnvp --dataset digits-conditional --steps 1500 --batch-size 128 \
  -o "$ckpt/realnvp-digits-conditional.pt"
"$flowserve" plot "$ckpt/realnvp-digits-conditional.pt" -o "$out/realnvp-digits-conditional.png"
