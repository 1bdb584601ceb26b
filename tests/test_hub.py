"""--model org/name[:QUANT] from the Hugging Face Hub: a local Hub (fake_hub.py) reached through
HF_ENDPOINT serves the random checkpoints and GGUF files the other tests make. The downloaded model
must answer what the same files given as a local path answer (and transformers' reference), each
failure must be one line naming the fix, the cache must serve offline, a download cut off must
resume, and at 2 ranks only rank 0 may talk to the Hub."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from checkpoints import reference_run, write_tokenizer
from conftest import mpi_env, mpirun_cmd, run_mpi
from fake_hub import TOKEN, FakeHub
from test_gguf import write_tiny
from tpi_mpi import hub as hubmod
from tpi_mpi.config import RunConfig
from tpi_mpi.errors import ConfigError
from tpi_mpi.generate import run_generation
from tpi_mpi.sampling import SamplingConfig
from tpi_mpi.startup import Session
from tpi_mpi.steps import Root

PROMPT = [5, 9, 17, 33, 60, 2, 11]
CLOSED_PORT = "http://127.0.0.1:9"      # the discard port: nothing listens there, a connection is refused


@pytest.fixture(scope="module")
def sources(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """The local files the Hub serves: a safetensors checkpoint and a GGUF repo's folder."""
    folder = tmp_path_factory.mktemp("gguf_repo")
    write_tiny(folder / "tiny-Q8_0.gguf", "llama", Q.Q8_0)
    write_tiny(folder / "tiny-Q4_K_M.gguf", "llama", Q.Q4_K)
    write_tokenizer(folder)           # its vocabulary has no merges: a tokenizer.json beside it, fetched with it
    (folder / "README.md").write_text("a GGUF repo")
    return {"safetensors": checkpoints("llama"), "gguf": folder}


@pytest.fixture
def hub(sources, tmp_path, monkeypatch):
    """The local Hub, with HF_ENDPOINT at it, an empty Hugging Face cache and no token."""
    server = FakeHub()
    server.add("acme/tiny", sources["safetensors"])
    extra = {"README.md": b"not downloaded", "onnx/model.onnx": b"not downloaded either"}
    server.repos["acme/tiny"].files.update(extra)
    server.add("acme/tiny-GGUF", sources["gguf"])
    server.add("acme/private", sources["safetensors"], private=True)
    server.add("acme/gated", sources["safetensors"], gated=True)
    server.add("acme/pickles", {"config.json": b"{}", "pytorch_model.bin": b"\0"})
    monkeypatch.setenv("HF_ENDPOINT", server.start().url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))   # a login on this machine
    yield server
    server.stop()


def generate(model: str, cache: Path):
    s = Session(RunConfig(model=model, cache_dir=str(cache), quiet=True, kv_dtype="fp32"))
    try:
        return run_generation(Root(s), PROMPT, SamplingConfig(0.0), 8, ignore_eos=True)
    finally:
        s.close()


def fetched(hub: FakeHub) -> set[str]:
    """The files the Hub sent (GET), by their path in the repo."""
    return {p.split("/resolve/")[1].split("/", 1)[1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}


# -- names and files ----------------------------------------------------------------------------------

def test_a_repo_id_is_a_hub_model_unless_a_path_by_that_name_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hubmod.parse_ref("acme/tiny-GGUF:q4_k_m") == hubmod.HubRef("acme/tiny-GGUF", "q4_k_m")
    assert hubmod.parse_ref("acme/tiny") == hubmod.HubRef("acme/tiny")
    for path in ("./acme/tiny", "/models/tiny", "~/tiny", "acme/tiny.gguf", "a/b/c", "../x/y", "acme/x:Q4 K"):
        assert hubmod.parse_ref(path) is None, path
    (tmp_path / "acme" / "tiny").mkdir(parents=True)
    assert hubmod.parse_ref("acme/tiny") is None
    assert hubmod.resolve("acme/tiny") == Path("acme/tiny")
    assert hubmod.display_name("acme/tiny-GGUF:Q8_0") == "acme/tiny-GGUF:Q8_0"


REPO_FILES = ["README.md", "m-Q4_K_M.gguf", "m-q8_0.gguf", "m-F16.gguf", "mmproj-m-F16.gguf", "m-IQ3_XS.gguf",
              "big/m-Q6_K-00001-of-00002.gguf", "big/m-Q6_K-00002-of-00002.gguf", "tokenizer.json"]


@pytest.mark.parametrize("quant,files", [
    ("Q8_0", ["m-q8_0.gguf", "tokenizer.json"]),                  # case-insensitive, the tokenizer beside it
    ("q4_k_m", ["m-Q4_K_M.gguf", "tokenizer.json"]),
    ("iq3_xs", ["m-IQ3_XS.gguf", "tokenizer.json"]),
    ("Q6_K", ["big/m-Q6_K-00001-of-00002.gguf", "big/m-Q6_K-00002-of-00002.gguf"]),   # every part of a split file
    (None, ["m-Q4_K_M.gguf", "tokenizer.json"]),                  # the default, as llama.cpp's
])
def test_the_quant_picks_its_gguf_files(quant, files):
    got, model, note = hubmod.pick(hubmod.HubRef("acme/m-GGUF", quant), REPO_FILES)
    assert got == files and model == files[0]
    if quant is None:
        assert note == "Q4_K_M, the default; the repo also has F16, IQ3_XS, Q6_K, Q8_0 (pick one as acme/m-GGUF:QUANT)"


def test_without_q4_k_m_the_default_is_the_smallest_kept_type():
    assert hubmod.pick(hubmod.HubRef("a/b"), ["b.F16.gguf", "b.Q8_0.gguf", "b.Q4_0.gguf"])[1] == "b.Q4_0.gguf"


def test_a_safetensors_repo_gives_config_tokenizer_and_weights_only():
    files = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "consolidated.safetensors", "tokenizer.json", "tokenizer_config.json",
             "README.md", "original/params.json", "pytorch_model.bin", "model-Q4_0.gguf"]
    got, model, _ = hubmod.pick(hubmod.HubRef("a/b"), files)
    # the index names the shards, fetched next: not the consolidated copy beside them
    assert sorted(got) == ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
    assert model is None
    assert hubmod.pick(hubmod.HubRef("a/b", "Q4_0"), files)[1] == "model-Q4_0.gguf"


# -- downloads ----------------------------------------------------------------------------------------

def test_a_hub_model_answers_as_its_local_folder_and_transformers(hub, sources, tmp_path):
    local = generate(str(sources["safetensors"]), tmp_path / "c1")
    got = generate("acme/tiny", tmp_path / "c2")
    assert got.generated_ids == local.generated_ids == reference_run(sources["safetensors"], PROMPT, 8)[1]
    np.testing.assert_array_equal(got.first_logits, local.first_logits)
    assert fetched(hub) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                       "tokenizer_config.json"}        # not README.md nor onnx/
    snapshot = hubmod.cached_snapshot("acme/tiny")
    assert snapshot.parent.parent == tmp_path / "hf" / "hub" / "models--acme--tiny"     # the standard cache
    for name in fetched(hub):
        assert (snapshot / name).read_bytes() == (sources["safetensors"] / name).read_bytes()
    assert [p.name.split("-w1-")[0] for p in (tmp_path / "c2").iterdir()] == ["acme--tiny"]


def test_a_gguf_quant_answers_as_its_local_file(hub, sources, tmp_path):
    local = generate(str(sources["gguf"] / "tiny-Q8_0.gguf"), tmp_path / "c1")
    got = generate("acme/tiny-GGUF:q8_0", tmp_path / "c2")
    assert got.generated_ids == local.generated_ids
    np.testing.assert_array_equal(got.first_logits, local.first_logits)
    assert fetched(hub) == {"tiny-Q8_0.gguf", "tokenizer.json", "tokenizer_config.json"}    # not the other quant


def test_a_draft_model_by_hub_name_keeps_the_greedy_answer(hub, sources, tmp_path):
    plain = generate(str(sources["safetensors"]), tmp_path / "c")
    s = Session(RunConfig(model=str(sources["safetensors"]), draft="acme/tiny", cache_dir=str(tmp_path / "c"),
                          quiet=True, kv_dtype="fp32"))
    try:
        got = run_generation(Root(s), PROMPT, SamplingConfig(0.0), 8, ignore_eos=True)
    finally:
        s.close()
    assert got.generated_ids == plain.generated_ids and got.draft["proposed"] > 0
    assert len(hub.gets("model.safetensors")) == 1


def test_a_gguf_repo_without_quant_takes_q4_k_m_and_says_so(hub):
    said = []
    path = hubmod.resolve("acme/tiny-GGUF", said.append)
    assert path.name == "tiny-Q4_K_M.gguf" and path.is_file()
    assert any("Q4_K_M, the default; the repo also has Q8_0" in m for m in said)


def test_a_private_or_gated_repo_downloads_with_the_token(hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert (hubmod.resolve("acme/private") / "model.safetensors").is_file()
    assert (hubmod.resolve("acme/gated") / "model.safetensors").is_file()


def test_offline_the_cached_copy_serves_without_a_request(hub, monkeypatch):
    first = hubmod.resolve("acme/tiny-GGUF:Q8_0")
    hub.stop()
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    said = []
    assert hubmod.resolve("acme/tiny-GGUF:Q8_0", said.append) == first
    assert hub.requests == [] and "the cached copy" in said[0]
    with pytest.raises(ConfigError, match=r"^acme/tiny-GGUF has cached no .gguf file for Q4_K_M: it has Q8_0"):
        hubmod.resolve("acme/tiny-GGUF:Q4_K_M")
    monkeypatch.delenv("HF_HUB_OFFLINE")            # no network: the cached copy, said so
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_PORT)
    said.clear()
    assert hubmod.resolve("acme/tiny-GGUF:Q8_0", said.append) == first and "the cached copy" in said[0]


def test_a_download_cut_off_resumes_where_it_stopped(hub, sources, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 << 10)   # the bytes written before the cut count
    hub.cut_after["model.safetensors"] = 300_000
    path = hubmod.resolve("acme/tiny")
    ranges = hub.gets("model.safetensors")
    assert ranges[0] is None and len(ranges) == 2
    start = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 300_000                                  # asked for the rest only
    assert (path / "model.safetensors").read_bytes() == (sources["safetensors"] / "model.safetensors").read_bytes()


# -- failures: one line naming the fix -------------------------------------------------------------

ERRORS = [
    ("acme/nope", {}, r"^acme/nope: no such local path, and the Hub \(http://127.0.0.1:\d+\) has no model by that "
                      r"name, or it is private: check the name; for a private model set HF_TOKEN or run `hf auth login`"),
    ("acme/private", {}, r"^acme/private: no such local path, .* or it is private: .* set HF_TOKEN"),
    ("acme/private", {"HF_TOKEN": "hf_wrong"}, r"has no model by that name that your token can see"),
    ("acme/gated", {}, r"^acme/gated is gated: accept its terms at http://127.0.0.1:\d+/acme/gated, then set "
                       r"HF_TOKEN or run `hf auth login`"),
    ("acme/tiny-GGUF:Q5_K_S", {}, r"^acme/tiny-GGUF has no .gguf file for Q5_K_S: it has Q4_K_M, Q8_0 "
                                  r"\(e.g. --model acme/tiny-GGUF:Q4_K_M\)$"),
    ("acme/tiny:Q4_0", {}, r"^acme/tiny has no .gguf files, so :Q4_0 picks none: drop :Q4_0"),
    ("acme/pickles", {}, r"^acme/pickles has neither safetensors weights with a config.json nor .gguf files"),
    ("acme/tiny", {"HF_ENDPOINT": CLOSED_PORT},
     r"^acme/tiny: no such local path, the Hub \(http://127.0.0.1:9\) cannot be reached \(ConnectError\) and the "
     r"Hugging Face cache has no copy of it: connect, or give a local path \(HF_HUB_OFFLINE=1 uses a copy downloaded "
     r"before\)$"),
    ("acme/tiny", {"HF_HUB_OFFLINE": "1"}, r"^acme/tiny: no such local path, and with HF_HUB_OFFLINE=1 the Hugging Face "
                                           r"cache \(.*/hf/hub\) has no copy of it: unset HF_HUB_OFFLINE to download it, "
                                           r"or give a local path$"),
]


@pytest.mark.parametrize("model,env,message", ERRORS, ids=[f"{m}-{','.join(e)}" for m, e, _ in ERRORS])
def test_each_failure_is_one_line_naming_the_fix(hub, monkeypatch, model, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        hubmod.resolve(model)
    assert "\n" not in str(e.value)
    assert re.search(message, str(e.value)), str(e.value)


def test_the_command_line_prints_the_one_line_and_exits_1(hub, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tpi_mpi", "generate", "--model", "acme/nope", "--prompt", "hi",
                        "--cache-dir", str(tmp_path / "c")], capture_output=True, text=True, timeout=120,
                       env={**mpi_env(), "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"tpi_mpi: error: acme/nope: no such local path, and the Hub ({hub.url}) has no model by that name, or it is "
        "private: check the name; for a private model set HF_TOKEN or run `hf auth login` (huggingface-cli login)"]


def test_info_and_prepare_take_a_hub_model(hub, tmp_path):
    from click.testing import CliRunner

    from tpi_mpi.cli import cli

    r = CliRunner().invoke(cli, ["info", "acme/tiny-GGUF:Q8_0", "-n", "2"])
    assert r.exit_code == 0, r.output
    assert "Q8_0" in r.output
    r = CliRunner().invoke(cli, ["prepare", "acme/tiny", "-n", "2", "--out", str(tmp_path / "p"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p" / "rank1").is_dir()


# -- two ranks: rank 0 alone downloads -------------------------------------------------------------

@pytest.mark.mpi
def test_at_two_ranks_only_rank_0_talks_to_the_hub(hub, sources, tmp_path):
    """Rank 1 runs with a Hub that refuses connections, offline, with a Hugging Face cache and a
    prepared cache of its own: it can only have got its shard from rank 0."""
    args = ["generate", "--prompt", "x", "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos", "--json",
            "--allreduce", "star", "--kv-dtype", "fp32", "--quiet", "--cache-dir", str(tmp_path / "cache-{rank}")]
    worker_env = ["env", f"HF_ENDPOINT={CLOSED_PORT}", "HF_HUB_OFFLINE=1", f"HF_HOME={tmp_path / 'hf-rank1'}"]
    tpi = [sys.executable, "-m", "tpi_mpi"]

    def run(model: str) -> dict:
        cmd = mpirun_cmd(1) + tpi + args + ["--model", model, ":", "-n", "1"] + worker_env + tpi + args + \
            ["--model", model]
        r = run_mpi(cmd, capture_output=True, text=True, timeout=300, env=mpi_env(), stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)

    local = run(str(sources["safetensors"]))
    got = run("acme/tiny")
    assert got["generated_ids"] == local["generated_ids"] and got["world_size"] == 2
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert len(hub.gets(name)) == 1, hub.requests      # one download of each file: rank 0's
    assert not (tmp_path / "hf-rank1").exists()
    assert any((tmp_path / "cache-1").glob("acme--tiny-*/rank1/*.safetensors"))     # shipped to rank 1
