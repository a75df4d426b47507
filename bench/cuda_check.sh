#!/usr/bin/env bash
# The --device cuda checks, run once on a machine with a GPU (see README "GPU").
# Writes its log to ${OUT:-/tmp}/cuda_check.log.
set -u
LOG=${OUT:-/tmp}/cuda_check.log
export PYTHONPATH=$PWD
S=sample_models
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_qat.py 2>&1 | tail -5
  T=$(mktemp -d)
  time python3 -m qatconv prepare --model $S/digits_mlp.py:DigitsMLP --weights $S/digits_mlp.safetensors \
      --data $S/digits_train.npz --mode finetune --steps 400 --batch-size 128 --device cuda \
      -o $T/qat_cuda.safetensors --json | python3 -c "import json,sys; d=json.load(sys.stdin); print('cuda metrics', d['metrics'])"
  echo "prepare rc=${PIPESTATUS[0]}"
  python3 -m qatconv fold $T/qat_cuda.safetensors -o $T/folded.safetensors --check $S/digits_heldout.npz --json \
      | python3 -c "import json,sys; d=json.load(sys.stdin); print('fold check', d['check'])"
  echo "fold rc=${PIPESTATUS[0]}"
  python3 -m qatconv prepare --model $S/digits_mlp.py:DigitsMLP --weights $S/digits_mlp.safetensors \
      --data $S/digits_train.npz --mode finetune --steps 400 --batch-size 128 --device auto \
      -o $T/qat_auto.safetensors --quiet; echo "auto rc=$?"
} 2>&1 | tee "$LOG"
