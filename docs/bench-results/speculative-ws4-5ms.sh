#!/bin/bash
cd /work/main && . .venv/bin/activate
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
G=$(python -c "from tpi_mpi.gguf import builtin_model_path; print(builtin_model_path())")
TEXT="Repeat the following text exactly, word for word: The GNU General Public License is a free, copyleft license for software and other kinds of works. The licenses for most software and other practical works are designed to take away your freedom to share and change the works. By contrast, the GNU General Public License is intended to guarantee your freedom to share and change all versions of a program."
run() {
  label=$1; shift
  mpirun --oversubscribe -n 4 python -m tpi_mpi generate --chat --prompt "$TEXT" --max-new-tokens 80 --temperature 0 \
    --link-model 5ms,300mbit --allreduce star --json --quiet "$@" 2>/dev/null \
    | python -c "import json,sys; d=json.loads(sys.stdin.read()); print('$label', round(d['tokens_per_s'],3), len(d['generated_ids']), d['decode_steps'], d['draft'], hash(tuple(d['generated_ids'])) % 100000)"
}
for round in 1 2; do
  run none
  run ngram --draft ngram
  run q4 --draft /tmp/smol-q4
  run self --draft "$G"
  run scrambled --draft /tmp/smol-bad
done
