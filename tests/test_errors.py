"""Bad input fails early, says what and how to fix, exits non-zero, and leaves nothing half-written."""

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from pipeline.build import Builder
from pipeline.random_weights import make_random_checkpoint
from pipeline.recipe import recipe_from_dict
from tests.conftest import mpirun, run_cli


def _artifacts(home):
    folder = home / "convert"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_wrong_recipe_key(home, recipe_file):
    path = recipe_file("bad", {"model": {"random": "gpt2-tiny"}, "paralell": {"tp": 2}})
    proc = run_cli(home, "build", str(path))
    assert proc.returncode == 2
    assert "paralell: unknown key; did you mean 'parallel'?" in proc.stderr


def test_tp2_for_smollm2_is_refused_before_any_work(home, smollm2_dir, recipe_file):
    before = _artifacts(home)
    path = recipe_file("smol", {"model": {"local": str(smollm2_dir)}, "parallel": {"tp": 2}})
    proc = run_cli(home, "build", str(path))
    assert proc.returncode == 2
    assert ("parallel.tp: 2 does not divide the model's 9 attention heads; choose tp from [1, 3, 9], or split the "
            "model with parallel.pp instead") in proc.stderr
    assert _artifacts(home) == before


@pytest.fixture(scope="module")
def tiny_tp2(home):
    recipe = recipe_from_dict({"model": {"random": "gpt2-tiny"}, "precision": {"dtype": "float32"},
                               "parallel": {"tp": 2}}, name="errors-tiny-tp2")
    return Builder(recipe, log=lambda _: None, show_progress=False).run().artifact


def test_world_size_that_does_not_match(home, tiny_tp2):
    proc = mpirun(home, 1, "--engine", str(tiny_tp2), "--prompt-ids", "1,2")
    assert proc.returncode != 0
    assert "was built for 2 rank(s) (tp=2, pp=1) but 1 was started; run: mpirun -n 2 python -m pipeline.run" \
        in proc.stderr


def test_corrupt_rank_file_stops_every_rank(home, tiny_tp2, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_tp2, copy)
    rank1 = copy / "rank1.safetensors"
    rank1.write_bytes(rank1.read_bytes()[:-100])
    proc = mpirun(home, 2, "--engine", str(copy), "--prompt-ids", "1,2")
    assert proc.returncode != 0
    assert "rank 1:" in proc.stderr and "truncated or corrupt" in proc.stderr


def test_modified_rank_file_is_refused_unless_overridden(home, tiny_tp2, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(tiny_tp2, copy)
    rank0 = copy / "rank0.safetensors"
    data = bytearray(rank0.read_bytes())
    data[-1] ^= 0xFF
    rank0.write_bytes(bytes(data))
    proc = mpirun(home, 2, "--engine", str(copy), "--prompt-ids", "1,2")
    assert proc.returncode != 0
    assert "rank0.safetensors does not match the sha256 in its manifest" in proc.stderr
    assert "--no-verify" in proc.stderr
    proc = mpirun(home, 2, "--engine", str(copy), "--prompt-ids", "1,2", "--no-verify", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr


def test_a_verified_rank_file_is_not_reread_until_it_changes(home, tiny_tp2, tmp_path, monkeypatch):
    """pipeline.run's check remembers a rank file's digest by (path, size, mtime): a second run of an unchanged
    artifact reads none of its bytes, and a file changed since (new mtime) is read again and refused."""
    import hashlib

    from pipeline.verify import verify_problem

    copy = tmp_path / "artifact"
    shutil.copytree(tiny_tp2, copy)
    assert verify_problem(copy, 0, True) is None
    reads = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: reads.append(1) or real(*a))
    assert verify_problem(copy, 0, True) is None
    assert reads == []
    rank0 = copy / "rank0.safetensors"
    data = bytearray(rank0.read_bytes())
    data[-1] ^= 0xFF
    rank0.write_bytes(bytes(data))
    os.utime(rank0, ns=(rank0.stat().st_atime_ns, rank0.stat().st_mtime_ns + 1000))
    assert "does not match the sha256" in verify_problem(copy, 0, True)
    assert reads


def test_missing_and_corrupt_source_safetensors(home, tmp_path, recipe_file):
    src = tmp_path / "model"
    make_random_checkpoint("llama-tiny", 1, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    before = _artifacts(home)
    recipe = recipe_file("local", {"model": {"local": str(src)}, "precision": {"dtype": "float32"}})

    weights.unlink()
    proc = run_cli(home, "build", str(recipe))
    assert proc.returncode == 2
    assert "no *.safetensors files" in proc.stderr

    weights.write_bytes(data[: len(data) // 2])
    proc = run_cli(home, "build", str(recipe))
    assert proc.returncode == 2
    assert f"{weights}: tensor" in proc.stderr and "truncated or corrupt" in proc.stderr
    assert _artifacts(home) == before  # no finished or half-written convert folder


def test_missing_local_folder(home, recipe_file, tmp_path):
    recipe = recipe_file("nowhere", {"model": {"local": str(tmp_path / "nowhere")}})
    proc = run_cli(home, "build", str(recipe))
    assert proc.returncode == 2
    assert "has no config.json" in proc.stderr and "point model.local at a folder" in proc.stderr


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_hub_source_offline_says_how_to_use_a_local_folder(home, env):
    proc = run_cli(home, "build", "gpt2-fp16", timeout=120, **env)
    assert proc.returncode == 2
    assert "the Hugging Face Hub is unreachable" in proc.stderr
    assert "model.local=DIR" in proc.stderr


def test_config_that_does_not_match_weights(home, tmp_path, recipe_file):
    src = tmp_path / "model"
    make_random_checkpoint("llama-tiny", 2, src)
    save_file({"model.embed_tokens.weight": torch.zeros(3, 3)}, src / "model.safetensors")
    proc = run_cli(home, "build", str(recipe_file("mismatch", {"model": {"local": str(src)}})))
    assert proc.returncode == 2
    assert "model.embed_tokens.weight' has shape [3, 3]" in proc.stderr


def test_bench_refuses_an_unknown_decode_path_before_starting_ranks(home):
    proc = run_cli(home, "bench", "gpt2-random", "--device-random", "--no-baseline", "--batched-variants",
                   "graph+cublas+warp-drive")
    assert proc.returncode == 2
    assert "--batched-variants: not a decode path: 'graph+cublas+warp-drive'" in proc.stderr
    assert "mpirun" not in proc.stderr  # no rank was started


def test_bench_refuses_a_spread_out_of_range_before_starting_ranks(home):
    proc = run_cli(home, "bench", "gpt2-random", "--device-random", "--no-baseline", "--output-spread", "1.5")
    assert proc.returncode == 2
    assert "--output-spread 1.5: give a fraction in [0, 1)" in proc.stderr
    assert "mpirun" not in proc.stderr
