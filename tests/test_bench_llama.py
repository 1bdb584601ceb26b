"""bench llama against a fake `llama-bench` (a script that prints JSON the way llama.cpp's does, with
known timings): the figures parsed from it, the command lines built, the JSON lines written, and the
one-line errors for a missing or failing binary. No real llama.cpp here."""

from __future__ import annotations

import json
import sys

import pytest
from click.testing import CliRunner

from tpi_mpi.bench.cli import bench
from tpi_mpi.bench.llama import bench_llama, find_llama_bench, llama_bench_command
from tpi_mpi.errors import ConfigError

# one test of llama-bench -o json as b11434 printed it on this machine (llama-bench -m llama2-7b-q4_0.gguf
# -o json -t 2 -p 0 -n 2 -r 1): every field of its test::get_fields(), then samples_ns and samples_ts
REAL_TEST = {
    "build_commit": "unknown", "build_number": 11434, "cpu_info": "AMD EPYC", "gpu_info": "", "backends": "CPU",
    "model_filename": "/opt/models/llama2-7b-q4_0.gguf", "model_type": "llama 7B Q4_0", "model_size": 3791273984,
    "model_n_params": 6738415616, "n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "cpu_mask": "0x0",
    "cpu_strict": False, "poll": 50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": -1, "n_cpu_moe": 0,
    "split_mode": "layer", "main_gpu": 0, "no_kv_offload": False, "flash_attn": -1, "devices": "auto",
    "tensor_split": "0.00", "tensor_buft_overrides": "none", "load_mode": "auto", "lazy_mode": "auto",
    "embeddings": False, "no_op_offload": 0, "no_host": False, "repack": True, "fit_target": 0, "fit_min_ctx": 0,
    "n_prompt": 0, "n_gen": 2, "n_depth": 0, "test_time": "2026-12-06T10:42:18Z", "avg_ns": 3268514563,
    "stddev_ns": 0, "avg_ts": 0.611899, "stddev_ts": 0.000000, "samples_ns": [3268514563], "samples_ts": [0.611899]}

# the fake: 10 ms per prompt token and 200 ms per token at -t 1 (half at -t 2), repeats at 100%, 90%
# and 110% of that; printed in llama-bench's layout (json_printer), its log on stderr
FAKE = r'''import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
print("llama_model_loader: loaded meta data with 30 key-value pairs", file=sys.stderr)
if os.environ.get("FAKE_FAIL"):
    print("main: error: failed to load model 'x.gguf'", file=sys.stderr)
    sys.exit(1)
opt = {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2)}
t, p, n, r = int(opt["-t"]), int(opt["-p"]), int(opt["-n"]), int(opt["-r"])
per_token_ns = {"pp": 10_000_000 // t, "tg": 200_000_000 // t}
tests = []
for kind, n_prompt, n_gen in (("pp", p, 0), ("tg", 0, n)):
    if n_prompt + n_gen:
        ns = [per_token_ns[kind] * (n_prompt + n_gen) * k // 100 for k in (100, 90, 110)][:r]
        ts = [(n_prompt + n_gen) * 1e9 / x for x in ns]
        tests.append(dict(REAL_TEST, model_filename=opt["-m"], n_threads=t, n_prompt=n_prompt, n_gen=n_gen,
                          avg_ns=sum(ns) // len(ns), avg_ts=sum(ts) / len(ts), samples_ns=ns, samples_ts=ts))
blocks = []
for test in tests:
    fields = [f"    \"{k}\": {json.dumps(v)}" for k, v in test.items() if not k.startswith("samples")]
    fields += [f"    \"{k}\": [ {', '.join(map(str, test[k]))} ]" for k in ("samples_ns", "samples_ts")]
    blocks.append("  {\n" + ",\n".join(fields) + "\n  }")
sys.stdout.write("[\n" + ",\n".join(blocks) + "\n]\n")
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake llama-bench first on PATH; returns (its path, the file logging each call's arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "llama-bench"
    exe.write_text(f"#!{sys.executable}\nREAL_TEST = {REAL_TEST!r}\n{FAKE}")
    exe.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    return exe, log, model


def calls(log) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_figures_are_medians_per_thread_count(fake, tmp_path, capsys):
    exe, log, model = fake
    out = tmp_path / "llama.jsonl"
    records = bench_llama(str(model), None, [2, 1], n_gen=16, n_prompt=128, repeats=3, pin=False, out=str(out))
    assert [r["threads"] for r in records] == [2, 1]
    two, one = records
    assert one["s_per_token"] == pytest.approx(0.2) and two["s_per_token"] == pytest.approx(0.1)
    assert one["tokens_per_s"] == pytest.approx(5.0)
    assert one["prompt_s"] == pytest.approx(1.28) and one["s_per_prompt_token"] == pytest.approx(0.01)
    assert one["prefill_tok_s"] == pytest.approx(100.0)
    assert one["decode_spread"] == pytest.approx(0.2) and one["prefill_spread"] == pytest.approx(0.2)
    assert one["decode_samples_s"] == pytest.approx([3.2, 2.88, 3.52])
    assert (one["prompt_tokens"], one["new_tokens"]) == (128, 16)
    assert one["llama_cpp"]["build_number"] == 11434 and one["llama_cpp"]["model_type"] == "llama 7B Q4_0"
    assert one["runner"] == "llama.cpp" and one["llama_bench"] == str(exe) and one["taskset"] is None
    assert "load_avg" in one and "load_avg_after" in one and "commit" in one
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["threads"] for x in lines] == [2, 1] and lines[1]["s_per_token"] == pytest.approx(0.2)
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["runner", "threads", "taskset"] and len(table) == 3
    assert "0.2000" in table[2] and "20.0%" in table[2]


def test_command_lines(fake):
    exe, log, model = fake
    bench_llama(str(model), str(exe), [2], n_gen=8, n_prompt=0, repeats=2, pin=False, out=None)
    assert calls(log) == [["-m", str(model), "-o", "json", "-t", "2", "-p", "0", "-n", "8", "-r", "2"]]
    assert llama_bench_command("lb", "m.gguf", 1, 128, 16, 3, pin=True) == \
        ["taskset", "-c", "0", "lb", "-m", "m.gguf", "-o", "json", "-t", "1", "-p", "128", "-n", "16", "-r", "3"]
    assert llama_bench_command("lb", "m.gguf", 4, 0, 16, 3, pin=True)[:3] == ["taskset", "-c", "0-3"]


def test_decode_only_run_has_no_prefill_figures(fake):
    exe, log, model = fake
    (r,) = bench_llama(str(model), None, [1], n_gen=4, n_prompt=0, repeats=3, pin=False, out=None)
    assert r["s_per_token"] == pytest.approx(0.2) and "prompt_s" not in r


def test_missing_binary_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="llama-bench is not on PATH: build it .*cmake --build build --target "
                                          "llama-bench.*--llama-bench PATH"):
        find_llama_bench(None)
    with pytest.raises(ConfigError, match=f"--llama-bench {tmp_path}/nope: no executable llama-bench"):
        find_llama_bench(str(tmp_path / "nope"))


def test_given_folder_finds_the_binary(fake):
    exe, _, _ = fake
    assert find_llama_bench(str(exe.parent)) == str(exe)


def test_failing_llama_bench_gives_its_last_error_line(fake, monkeypatch):
    exe, log, model = fake
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(ConfigError, match=r"llama-bench failed \(exit 1\): main: error: failed to load model"):
        bench_llama(str(model), None, [2], n_gen=4, n_prompt=0, repeats=1, pin=False, out=None)


def test_command_line_errors_are_one_line(fake, tmp_path, monkeypatch):
    exe, log, model = fake
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(bench, ["llama", "--model", str(model), "--threads", "1", "--n-prompt", "0",
                                   "--n-gen", "4", "--repeats", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "bench-results" / "llama.jsonl").read_text())["threads"] == 1
    r = CliRunner().invoke(bench, ["llama", "--model", str(model), "--threads", "two"])
    assert isinstance(r.exception, ConfigError) and "--threads 'two'" in str(r.exception)
    r = CliRunner().invoke(bench, ["llama", "--model", str(tmp_path / "missing.gguf")])
    assert isinstance(r.exception, ConfigError) and "no such file" in str(r.exception)
