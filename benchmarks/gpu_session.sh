#!/usr/bin/env bash
# One prepared GPU session (run from the repo root on a CUDA machine; the fixtures are in tests/fixtures):
# correctness and host-sync checks + the benchmark, the test suite, and encode's throughput and CUDA path.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "=== gpu_check"; timeout 200 python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log" | grep -v "^\s*$"
echo "=== test suite on the GPU machine"; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/ 2>&1 | tail -25
echo "=== encode on CUDA, 1-process torchrun (NCCL)"
timeout 60 python3 -m torch.distributed.run --nproc-per-node 1 -m hevc_vit encode src/hevc_vit/assets --out /tmp/enc_ddp --quiet 2>&1 | tail -5
echo "=== encode throughput"
timeout 150 python3 benchmarks/encode_throughput.py --images 300 --model large --workers 12 --check 16 --json "$OUT/encode.json" 2>&1 | tail -30
