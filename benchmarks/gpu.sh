#!/usr/bin/env bash
# Figures 1, 2 (quick), 5 and 6 on CUDA, written to benchmarks/out/*_cuda.json.
#
#   bash benchmarks/gpu.sh
#
# Our training step runs under bf16 autocast on CUDA (as trainables.loop does, train.amp);
# the plain sentence-transformers sides use bf16 too; bench_step also times the frozen-base
# path with features staged through pinned host memory and with the tables kept on the GPU.
# Exits with status 2 and a message when torch sees no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(python -c 'import torch; print(torch.cuda.is_available())' 2>/dev/null)" != "True" ]; then
    echo "gpu.sh: torch.cuda.is_available() is not True on this machine: nothing was run." >&2
    echo "gpu.sh: for the CPU figures run: python -m benchmarks.bench_<cache|step|eval|memory> [--quick]" >&2
    exit 2
fi

export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p benchmarks/out
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'

echo "== figure 1: trial overhead (launch: TorchTrainer, 1 DDP worker on the GPU; vs train)"
python -m benchmarks.bench_study --figures 1 --device cuda --out benchmarks/out/study_cuda.json
echo "== figure 2: frozen-base embedding cache (quick: a 500-doc subset, extrapolated)"
python -m benchmarks.bench_cache --quick --device cuda --out benchmarks/out/cache_quick_cuda.json
echo "== figure 5: training step throughput (bf16 autocast)"
python -m benchmarks.bench_step --device cuda --out benchmarks/out/step_cuda.json
echo "== figure 6: evaluation search (torch on the GPU vs faiss-cpu)"
python -m benchmarks.bench_eval --device cuda --out benchmarks/out/eval_cuda.json
echo "gpu.sh: done; results in benchmarks/out/*_cuda.json"
