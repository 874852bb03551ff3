#!/usr/bin/env bash
# The GPU session of 2026-12-04 (issue 16): buildings and roads, coarse model then refiner,
# side by side on one lent GPU, each within SECS seconds (release/train_timed.py sets the
# iterations from the measured speed). Needs .train/gpu/chips.pack.npz and .train/gpu/init/
# (release/gpu_pack.py pack / init); writes the weights-only checkpoints and logs to $OUT.
#   [G=.train/gpu] PY=python3 SECS=450 W=7 B=16 OUT=/somewhere bash release/gpu_session.sh [train_timed options]
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
G=${G:-.train/gpu}
nvidia-smi -L || true
$PY -c "import torch,timm,numpy,PIL;print(torch.__version__,timm.__version__,numpy.__version__,PIL.__version__,torch.cuda.is_available())"
$PY release/gpu_pack.py unpack "$G/chips.pack.npz" .train > /tmp/unpack.out 2>&1 || { cat /tmp/unpack.out; exit 1; }
C='{"arch": "lite-fpn", "variant": "lite1", "scale": [0.5, 2.0], "sensor_aug": true, "ema": 0.998}'
R='"arch": "lite-idgbr", "variant": "lite1", "scale": [0.5, 2.0], "sensor_aug": true, "ema": 0.998, "coarse_perturb": 0.5, "boundary_weight": 2'
for s in buildings roads; do
  m=''; [ $s = buildings ] && m=', "mode": "oneshot"'
  timeout $((SECS + 50)) $PY release/train_timed.py $s --seconds "$SECS" --workers "$W" \
    --batch-size "$B" --init-card "$G/init/$s.json" --out "$OUT" \
    --coarse-config "$C" --refiner-config "{$R$m}" "$@" > /tmp/$s.out 2>&1 &
done
wait
tail -n 15 /tmp/*.out
ls -la "$OUT"
