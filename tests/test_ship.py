"""Weight shipping: ranks without the shared cache get their shards from rank 0, checked."""

import json

import pytest

from conftest import run_tpi


def _run(model, cache, n=3):
    r = run_tpi(["generate", "--model", str(model), "--cache-dir", cache, "--prompt", "Hello there",
                 "--temperature", "0", "--max-new-tokens", "6", "--ignore-eos", "--json"], n=n)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


@pytest.mark.mpi
def test_shards_are_shipped_checked_and_reshipped_when_corrupt(checkpoints, tmp_path):
    model = checkpoints("qwen2")
    reference, _ = _run(model, str(tmp_path / "shared"))
    per_rank = str(tmp_path / "c{rank}")                  # one cache per rank: no shared filesystem
    first, err = _run(model, per_rank)
    assert first["generated_ids"] == reference["generated_ids"]
    assert "to rank 1" in err and "to rank 2" in err
    folders = {r: next((tmp_path / f"c{r}").iterdir()) / f"rank{r}" for r in range(3)}
    assert not (folders[1].parent / "rank0").exists()      # a worker holds its own shard only
    assert not (folders[1].parent / "rank2").exists()

    again, err = _run(model, per_rank)
    assert "shipping" not in err                            # up to date: nothing moves
    assert again["generated_ids"] == reference["generated_ids"]

    block = folders[1] / "layer001.mlp.safetensors"
    data = bytearray(block.read_bytes())
    data[-3] ^= 0x55                                        # same size, one byte flipped
    block.write_bytes(bytes(data))
    (folders[2] / "layer000.attn.safetensors").unlink()
    fixed, err = _run(model, per_rank)
    assert "shipping 1 file(s)" in err and "to rank 1" in err and "to rank 2" in err
    assert fixed["generated_ids"] == reference["generated_ids"]
    manifest = json.loads((folders[1] / "manifest.json").read_text())
    assert block.stat().st_size == manifest["files"][block.name]["size"]


@pytest.mark.mpi
def test_manifest_naming_a_file_outside_its_folder_is_refused(checkpoints, tmp_path):
    from tpi_mpi.config import ParallelConfig
    from tpi_mpi.prepare import prepare

    out = prepare(checkpoints("qwen2"), tmp_path / "p", ParallelConfig(2))
    manifest = json.loads((out / "rank1" / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
    (out / "rank1" / "manifest.json").write_text(json.dumps(manifest))
    r = run_tpi(["generate", "--model", str(out), "--prompt", "hi", "--quiet"], n=2)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "names '../../etc/passwd', outside its folder" in errors[0], r.stderr
