"""The allreduce-on-edge-links figure and tables, from `bench comm` and `bench generate` JSON lines.

    python -m tpi_mpi.bench.plot COMM.jsonl docs/allreduce-edge.png [--generate GEN.jsonl] [--tables]

Bench-only: needs matplotlib (pip install 'tpi_mpi[bench]'), imported only to draw. The figure has
one panel per rank count and message size (ms per allreduce against one-way delay, median with
p10-p90 bars), and a last row with end-to-end s/token when --generate is given. `--tables` prints
the same numbers as Markdown. A point measured twice counts once: the later line wins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

FIXED = ("star", "mpi", "ring", "recdouble")
STYLE = {"star": ("tab:red", "o"), "mpi": ("tab:blue", "s"), "ring": ("tab:green", "^"),
         "recdouble": ("tab:purple", "D"), "auto": ("black", "x")}


def _label(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("one-way delay (ms), 300 Mbit/s")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def read(path: str | None) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def delay(rec: dict) -> float:
    return rec["link"].get("delay_ms", 0.0) if rec.get("link") else 0.0


def index_comm(records: list[dict]) -> dict:
    """{(kind, ranks, delay, size label, algorithm): record}, later lines winning."""
    out = {}
    for r in records:
        if r.get("bench") != "comm":
            continue
        size = f"{r['tokens']}x{r['hidden']}" if r.get("tokens") else None
        out[(r["kind"], r["ranks"], delay(r), size, r.get("algorithm"))] = r
    return out


def index_generate(records: list[dict]) -> dict:
    """{(ranks, delay, allreduce mode): record}; auto's mode is the start of its description. A
    point run more than once gets the mean s/token of its runs (and `runs`), the last run's rest."""
    out, runs = {}, {}
    for r in records:
        if r.get("runner") != "tpi_mpi":
            continue
        key = (r["ranks"], delay(r), r["allreduce"].split(" ")[0])
        runs.setdefault(key, []).append(r)
    for key, rs in runs.items():
        out[key] = {**rs[-1], "runs": len(rs), "s_per_token": sum(r["s_per_token"] for r in rs) / len(rs),
                    "s_per_token_runs": [r["s_per_token"] for r in rs]}
    return out


def auto_choice(description: str) -> str:
    """'auto (up to 4.00 KiB: star, up to 64.00 KiB: ring)' -> '<=4 KiB star, <=64 KiB ring'."""
    inner = description.removeprefix("auto").strip()
    inner = inner[1:-1] if inner.startswith("(") else inner
    return inner.replace("up to ", "<=").replace(".00 ", " ").replace(": ", " ") or "-"


def axes_values(comm: dict) -> tuple[list[int], list[float], list[str]]:
    ranks = sorted({k[1] for k in comm})
    delays = sorted({k[2] for k in comm})
    sizes = sorted({k[3] for k in comm if k[3]}, key=lambda s: (int(s.split("x")[0]) * int(s.split("x")[1]), s))
    return ranks, delays, sizes


# --- tables -------------------------------------------------------------------------------------------

def ratio_text(auto: float | None, best: float | None) -> str:
    return f"{auto / best:.2f}" if auto and best else "-"


def comm_tables(comm: dict) -> str:
    ranks, delays, sizes = axes_values(comm)
    lines = ["| ranks | one way ms (measured) | size | " + " | ".join(FIXED) + " | auto (chose) | auto / best |",
             "|---:|---:|---|" + "---:|" * (len(FIXED) + 2)]
    for n in ranks:
        for d in delays:
            for s in sizes:
                got = {a: comm.get(("allreduce", n, d, s, a)) for a in (*FIXED, "auto")}
                if not any(got.values()):
                    continue
                ping = comm.get(("pingpong", n, d, "1x576", None))
                measured = f"{d:g} ({ping['median_s'] * 1e3:.2f})" if ping else f"{d:g}"
                fixed = {a: r["median_s"] * 1e3 for a, r in got.items() if r and a != "auto"}
                best = min(fixed.values()) if fixed else None
                cells = [f"**{fixed[a]:.2f}**" if a in fixed and fixed[a] == best else
                         (f"{fixed[a]:.2f}" if a in fixed else "-") for a in FIXED]
                auto = got["auto"]
                auto_ms = auto["median_s"] * 1e3 if auto else None
                first = auto.get("trial_pick") if auto else None
                pick = f"{auto['chosen']}, trial: {first}" if first and first != auto["chosen"] else auto and auto["chosen"]
                auto_cell = f"{auto_ms:.2f} ({pick})" if auto else "-"
                lines.append(f"| {n} | {measured} | {s} | " + " | ".join(cells) + f" | {auto_cell} | "
                             f"{ratio_text(auto_ms, best)} |")
    return "\n".join(lines)


def idle_table(comm: dict) -> str:
    ranks, delays, _ = axes_values(comm)
    algos = (*FIXED, "auto")
    lines = ["| ranks | one way ms | " + " | ".join(algos) + " |", "|---:|---:|" + "---:|" * len(algos)]
    for n in ranks:
        for d in delays:
            got = [comm.get(("idle_cpu", n, d, None, a)) for a in algos]
            if any(got):
                lines.append(f"| {n} | {d:g} | " + " | ".join(f"{r['idle_cpu_per_wall']:.1%}" if r else "-"
                                                           for r in got) + " |")
    return "\n".join(lines)


def runs_note(rec: dict) -> str:
    """' (mean of 0.48, 0.51)' for a point run more than once."""
    runs = rec.get("s_per_token_runs", [])
    return f" (mean of {', '.join(f'{x:.3f}' for x in runs)})" if len(runs) > 1 else ""


def generate_table(gen: dict) -> str:
    ranks = sorted({k[0] for k in gen})
    delays = sorted({k[1] for k in gen})
    lines = ["| ranks | one way ms | " + " | ".join(FIXED) + " | auto | auto / best | auto chose | load avg |",
             "|---:|---:|" + "---:|" * (len(FIXED) + 2) + "---|---:|"]
    for n in ranks:
        for d in delays:
            got = {a: gen.get((n, d, a)) for a in (*FIXED, "auto")}
            if not any(got.values()):
                continue
            fixed = {a: r["s_per_token"] for a, r in got.items() if r and a != "auto"}
            best = min(fixed.values()) if fixed else None
            cells = [(f"**{fixed[a]:.3f}**" if fixed[a] == best else f"{fixed[a]:.3f}") + runs_note(got[a])
                     if a in fixed else "-" for a in FIXED]
            auto = got["auto"]
            loads = [r["load_avg"][0] for r in got.values() if r and r.get("load_avg")]
            lo, hi = (f"{min(loads):.1f}", f"{max(loads):.1f}") if loads else ("-", "-")
            load = lo if lo == hi else f"{lo}-{hi}"
            if auto:
                tail = (f"{auto['s_per_token']:.3f}{runs_note(auto)} | {ratio_text(auto['s_per_token'], best)} | "
                        f"{auto_choice(auto['allreduce'])}")
            else:
                tail = "- | - | -"
            lines.append(f"| {n} | {d:g} | " + " | ".join(cells) + f" | {tail} | {load} |")
    return "\n".join(lines)


# --- the figure ---------------------------------------------------------------------------------------

def plot(comm: dict, gen: dict, out: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install 'tpi_mpi[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks, delays, sizes = axes_values(comm)
    gen_ranks = sorted({k[0] for k in gen})
    rows = len(ranks) + (1 if gen else 0)
    cols = max(len(sizes), len(gen_ranks), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for i, n in enumerate(ranks):
        for j, s in enumerate(sizes):
            ax = axes[i][j]
            for a in (*FIXED, "auto"):
                pts = [(d, comm[k]) for d in delays if (k := ("allreduce", n, d, s, a)) in comm]
                if not pts:
                    continue
                x = [d for d, _ in pts]
                y = [r["median_s"] * 1e3 for _, r in pts]
                err = [[(r["median_s"] - r["p10_s"]) * 1e3 for _, r in pts],
                       [(r["p90_s"] - r["median_s"]) * 1e3 for _, r in pts]]
                color, marker = STYLE[a]
                ax.errorbar(x, y, yerr=err, color=color, marker=marker, capsize=2, label=a,
                            linestyle="--" if a == "auto" else "-", linewidth=1 if a == "auto" else 1.5)
            _label(ax, f"{n} ranks, {s} float32", "ms per allreduce")
        for j in range(len(sizes), cols):
            axes[i][j].axis("off")
    if gen:
        for j, n in enumerate(gen_ranks):
            ax = axes[-1][j]
            gd = sorted({k[1] for k in gen if k[0] == n})
            for a in (*FIXED, "auto"):
                pts = [(d, gen[(n, d, a)]["s_per_token"]) for d in gd if (n, d, a) in gen]
                if pts:
                    color, marker = STYLE[a]
                    ax.plot(*zip(*pts), color=color, marker=marker, label=a, linestyle="--" if a == "auto" else "-")
            _label(ax, f"SmolLM2-135M end to end, {n} ranks", "s per token (decode)")
        for j in range(len(gen_ranks), cols):
            axes[-1][j].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Allreduce on emulated edge links (tpi_mpi.netem): star vs MPI_Allreduce vs ring vs "
                 "recursive doubling, and auto")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


@click.command()
@click.argument("comm_jsonl")
@click.argument("out_png", required=False)
@click.option("--generate", "generate_jsonl", help="bench generate JSON lines for the end-to-end row.")
@click.option("--tables", is_flag=True, help="Print the numbers as Markdown tables.")
def main(comm_jsonl: str, out_png: str | None, generate_jsonl: str | None, tables: bool) -> None:
    comm, gen = index_comm(read(comm_jsonl)), index_generate(read(generate_jsonl))
    if not comm and not gen:
        sys.exit(f"no bench comm or generate records in {comm_jsonl} {generate_jsonl or ''}")
    if out_png:
        plot(comm, gen, out_png)
        print(f"wrote {out_png}", file=sys.stderr)
    if tables:
        ranks_view = "mean over ranks" if all(r.get("over_ranks") == "mean" for k, r in comm.items()
                                               if k[0] == "allreduce") else "slowest rank"
        print(f"Allreduce, ms per call (median, {ranks_view}; bold: the best fixed algorithm):\n")
        print(comm_tables(comm))
        print("\nIdle CPU of a waiting rank while rank 0 computes (CPU seconds per wall second):\n")
        print(idle_table(comm))
        if gen:
            rounds = {r.get("rounds") for r in gen.values()}
            how = (f"the median of {rounds.pop()} rounds, algorithms interleaved in one job" if len(rounds) == 1
                   and None not in rounds else "one job per algorithm")
            print(f"\nEnd to end, s per decode token ({how}; bold: the best fixed algorithm; a point run twice: "
                  f"the mean):\n")
            print(generate_table(gen))


if __name__ == "__main__":
    main()
