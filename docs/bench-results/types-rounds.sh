#!/bin/bash
# Decode and prefill per GGML type, tpi_mpi ws1 against llama.cpp on the same file, interleaved rounds (docs/quant-kernels.md).
# Files: bench synthetic-gguf tinyllama-1.1b --quant f16, then llama.cpp's llama-quantize to each type, in $DIR.
# DIR=... bash docs/bench-results/types-rounds.sh   (llama-bench on PATH)
export PATH=/opt/llama/build/bin:$PATH
DIR=${DIR:-/opt/models/types}
echo "# $(date -u) main at $(git rev-parse --short HEAD)"
for r in 1 2; do
  for q in Q4_0 Q8_0 Q4_K_M Q5_K_M Q6_K f16; do
    f=$DIR/tinyllama-$q.gguf
    echo "## $q round $r load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo -n "tpi_mpi: " && python -m tpi_mpi bench generate --model $f --prompt-tokens 64 --new-tokens 32 --warmup 2 --out '' 2>&1 | tail -1
    echo -n "llama:   " && python -m tpi_mpi bench llama --model $f --threads 2 --n-gen 32 --n-prompt 64 --repeats 2 --out '' 2>&1 | tail -1
  done
done
