#!/bin/bash
# One batch of GPU work: setup, tests/gpu, decode benchmarks. Logs into $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $OUT/gpu.txt
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)" >> $OUT/gpu.txt 2>&1
timeout 240 python3 -m pytest -q -s tests/gpu -p no:cacheprovider > $OUT/tests_gpu.log 2>&1
timeout 150 python3 tools/bench_decode.py --flavor phi2 --bf16 --positions 16 256 1024 --batch-sizes 1 8 > $OUT/decode_phi2_dense.log 2>&1
timeout 150 python3 tools/bench_decode.py --flavor phi2 --bf16 --num-experts 4 --moe-router-topk 2 --positions 16 256 1024 --batch-sizes 1 8 > $OUT/decode_phi2_moe.log 2>&1
tail -3 $OUT/*.log
