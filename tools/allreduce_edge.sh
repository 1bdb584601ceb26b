#!/bin/sh
# The allreduce figure and tables of docs/allreduce-results.md, on emulated edge links (issue 6).
# Needs root (network namespaces; see python -m tpi_mpi.netem --help) and matplotlib for the plot.
#
#   tools/allreduce_edge.sh comm|generate|simulate|plot [OUT_DIR]   (default bench-results/allreduce-edge)
#
# comm:     star, mpi, ring, recdouble and auto at 0, 1, 2 and 5 ms one way, 300 Mbit/s, on
#           RANKS ranks (default "2 4 8"), decode (1x576, 1x4096) and prefill (128x4096) messages
# generate: end-to-end s/token of the built-in SmolLM2-135M with the allreduce algorithms ALGOS (default all
#           five) compared in one job per link (bench generate --compare: 6 rounds of 12 new tokens each,
#           algorithms in random order), on the links DELAYS (default "0 2 5") and RANKS (default "2 4")
# simulate: bench comm as in `comm`, on 2 and 4 ranks, with --link-model instead of the emulator
#           (the comm layer sleeps each message's modelled time), into simulated.jsonl
# Each run is bounded by `timeout`; a failed run is reported and the others go on.
set -u
what=${1:?comm, generate, simulate or plot}
out=${2:-bench-results/allreduce-edge}
mkdir -p "$out"

case "$what" in
comm)
    for n in ${RANKS:-2 4 8}; do
        for d in 0 1 2 5; do
            timeout 600 python -m tpi_mpi.netem run --ranks "$n" --delay-ms "$d" --rate-mbit 300 -- \
                python -m tpi_mpi bench comm --sizes 1x576,1x4096,128x4096 --repeats 100 --min-repeats 20 \
                --warmup 2 --budget 4 --idle-seconds 0.5 --comm-timeout 120 --out "$out/comm.jsonl" \
                || echo "FAILED: bench comm, $n ranks, $d ms" >&2
        done
    done ;;
generate)
    for n in ${RANKS:-2 4}; do
        for d in ${DELAYS:-0 2 5}; do
            timeout 900 python -m tpi_mpi.netem run --ranks "$n" --delay-ms "$d" --rate-mbit 300 -- \
                python -m tpi_mpi bench generate --threads 1 --compare "${ALGOS:-star,mpi,ring,recdouble,auto}" \
                --rounds 6 --prompt-tokens 16 --new-tokens 12 --warmup 2 --quiet --out "$out/generate.jsonl" \
                || echo "FAILED: bench generate, $n ranks, $d ms" >&2
        done
    done ;;
simulate)
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1    # only needed as root
    for n in 2 4; do
        for d in 0 1 2 5; do
            timeout 300 mpirun --oversubscribe -n "$n" python -m tpi_mpi bench comm --link-model "${d}ms,300mbit" \
                --sizes 1x576,1x4096,128x4096 --repeats 20 --min-repeats 20 --warmup 2 --budget 1 --idle-seconds 0 \
                --out "$out/simulated.jsonl" || echo "FAILED: simulated bench comm, $n ranks, $d ms" >&2
        done
    done ;;
plot)
    python -m tpi_mpi.bench.plot "$out/comm.jsonl" docs/allreduce-edge.png --generate "$out/generate.jsonl" ;;
*)
    echo "usage: $0 comm|generate|simulate|plot [OUT_DIR]" >&2; exit 2 ;;
esac
