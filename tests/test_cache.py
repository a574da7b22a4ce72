"""Reproducible, cached builds: content-addressed stages, manifests, verify, golden tokens and gc."""

import hashlib
import json
import shutil
import signal
import subprocess
import time

import pytest

from pipeline.build import Builder, stage_dir
from pipeline.manifest import lock_drift, read_manifest
from pipeline.random_weights import make_random_checkpoint
from pipeline.recipe import recipe_from_dict
from tests.conftest import PYTHON, REPO, child_env, run_cli


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _recipe(extra=None, name="cache-tiny"):
    data = {"model": {"random": "llama-tiny", "seed": 3}, "precision": {"dtype": "float16"},
            "parallel": {"tp": 2, "pp": 1}}
    for key, value in (extra or {}).items():
        section, field = key.split(".", 1)
        data.setdefault(section, {})
        node = data[section]
        *parents, leaf = field.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return recipe_from_dict(data, name=name)


def _build(recipe):
    return Builder(recipe, log=lambda _: None, show_progress=False).run()


def test_second_build_hits_every_stage(home):
    first = _build(_recipe())
    start = time.perf_counter()
    second = _build(_recipe())
    seconds = time.perf_counter() - start
    assert [s.hit for s in second.stages] == [True, True]
    assert [s.key for s in first.stages] == [s.key for s in second.stages]
    print(f"second build: {seconds:.2f} s")


def test_rebuild_from_scratch_is_bit_identical_whatever_the_workers(home):
    first = _build(_recipe())
    digests = {p.name: _sha(p) for p in sorted(first.artifact.glob("rank*.safetensors"))}
    shutil.rmtree(first.artifact)
    again = _build(_recipe({"build.workers": 4}))  # workers do not shape the bytes, so not the key either
    assert again.artifact == first.artifact and not again.stages[1].hit
    assert {p.name: _sha(p) for p in sorted(again.artifact.glob("rank*.safetensors"))} == digests


def test_fp8_calibration_and_conversion_are_deterministic(home):
    recipe = _recipe({"precision.quantization": {"quant": "fp8", "kv_cache": "fp8",
                                                 "calibration": {"samples": 2, "seq_len": 16}},
                      "build.plugins": {"use_paged_context_fmha": False}}, name="cache-fp8")
    first = _build(recipe)
    digests = {p.name: _sha(p) for p in first.artifact.glob("rank*.safetensors")}
    shutil.rmtree(first.artifact)
    again = _build(recipe)
    assert {p.name: _sha(p) for p in again.artifact.glob("rank*.safetensors")} == digests
    record = read_manifest(again.artifact)["quantization"]["calibration"]
    assert record["dataset"] == "synthetic-random-token-ids" and record["seed"] == 1234  # no tokenizer: seeded ids


def test_what_each_change_rebuilds(home):
    base = _build(_recipe())
    runtime = _build(_recipe({"runtime.max_new_tokens": 5, "runtime.temperature": 0.8}))
    assert [s.hit for s in runtime.stages] == [True, True]
    assert [s.key for s in runtime.stages] == [s.key for s in base.stages]
    tp = _build(_recipe({"parallel.tp": 4}))
    assert tp.stages[0].hit and tp.stages[0].key == base.stages[0].key
    assert not tp.stages[1].hit and tp.stages[1].key != base.stages[1].key


def test_one_byte_of_a_source_file_changes_the_convert_key(home, tmp_path):
    src = tmp_path / "model"
    make_random_checkpoint("llama-tiny", 5, src)
    recipe = recipe_from_dict({"model": {"local": str(src)}, "precision": {"dtype": "float32"}}, name="local-src")
    before = _build(recipe)
    weights = src / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    after = _build(recipe)
    assert not after.stages[1].hit and after.stages[1].key != before.stages[1].key
    assert read_manifest(after.artifact)["inputs"]["model_files"]["model.safetensors"] == _sha(weights)


def test_manifest_records_inputs_outputs_versions_and_timings(home):
    result = _build(_recipe())
    m = read_manifest(result.artifact)
    assert m["key"] == result.stages[1].key and m["stage"] == "convert"
    assert m["recipe"]["parallel"] == {"tp": 2, "pp": 1}
    assert set(m["outputs"]) >= {"config.json", "rank0.safetensors", "rank1.safetensors"}
    assert m["outputs"]["rank1.safetensors"] == _sha(result.artifact / "rank1.safetensors")
    assert m["versions"]["torch"] and m["versions"]["pipeline"]
    assert m["seconds"] >= 0 and m["conversion"]["source_bytes"] > 0
    assert "lock_drift" in m and "host" in m


def test_lock_drift_is_reported(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("# pins\ntorch==0.0.1\npyyaml==6.0.4 ; python_version >= '3'\n")
    drift = lock_drift(lock)
    assert drift["torch"]["locked"] == "0.0.1" and drift["torch"]["installed"]
    assert "pyyaml" not in drift or drift["pyyaml"]["installed"] != "6.0.4"


def test_verify_names_a_modified_rank_file(home, tmp_path):
    artifact = _build(_recipe()).artifact
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    assert run_cli(home, "verify", str(copy)).returncode == 0
    with open(copy / "rank1.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    proc = run_cli(home, "verify", str(copy))
    assert proc.returncode == 1
    assert "rank1.safetensors: sha256 differs from the manifest" in proc.stderr
    assert "rank0.safetensors" not in proc.stderr


def test_verify_run_without_golden_outputs_says_so(home):
    artifact = _build(_recipe()).artifact
    proc = run_cli(home, "verify", str(artifact), "--run")
    assert proc.returncode == 1 and "declares no verify.golden outputs" in proc.stderr


@pytest.mark.slow
def test_golden_tokens_with_a_tokenizer(home, smollm2_dir, recipe_file):
    # the prompt goes through the chat template, as `pipeline.run` sends it: "The capital of France is Paris."
    recipe = {"model": {"local": str(smollm2_dir)}, "precision": {"dtype": "float32"}, "parallel": {"pp": 2},
              "verify": {"golden": [{"prompt": "What is the capital of France?", "tokens": [504, 3575, 282, 4649]}]}}
    path = recipe_file("golden", recipe)
    assert run_cli(home, "build", str(path)).returncode == 0
    artifact = json.loads((home / "builds" / "golden.json").read_text())["artifact"]
    proc = run_cli(home, "verify", artifact, "--run")
    assert proc.returncode == 0, proc.stderr
    assert "1 golden output(s) reproduced" in proc.stdout
    recipe["verify"]["golden"][0]["tokens"] = [504, 3575, 282, 42]
    path = recipe_file("golden", recipe)
    build = run_cli(home, "build", str(path))
    assert "hit" in build.stdout  # golden outputs are not part of any stage key
    proc = run_cli(home, "verify", artifact, "--run")
    assert proc.returncode == 1 and "tokens differ from position 3" in proc.stderr


@pytest.mark.slow
def test_killed_build_leaves_nothing_that_verifies(home, tmp_path):
    recipe = {"model": {"random": "gpt2", "seed": 9}, "precision": {"dtype": "bfloat16"}}
    path = tmp_path / "big.yaml"
    path.write_text(json.dumps(recipe))  # YAML reads JSON
    proc = run_cli(home, "build", str(path), "precision.dtype=float16")  # fetch once (random GPT-2 weights)
    assert proc.returncode == 0, proc.stderr
    convert = home / "convert"
    before = {p.name for p in convert.iterdir()}
    child = subprocess.Popen([PYTHON, "-m", "pipeline", "build", str(path)], cwd=REPO, env=child_env(home),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    tmp = None
    while time.time() < deadline and tmp is None:
        tmp = next((p for p in convert.iterdir() if p.name.startswith(".tmp-") and p.name not in before), None)
        time.sleep(0.005)
    assert tmp is not None, "the convert stage never started"
    time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = {p.name for p in convert.iterdir() if not p.name.startswith(".")} - before
    assert not finished  # nothing under a real key
    assert run_cli(home, "verify", str(tmp)).returncode == 1
    gc = run_cli(home, "gc")
    assert "left by an interrupted build" in gc.stdout and not tmp.exists()
    assert run_cli(home, "build", str(path)).returncode == 0  # and the next build completes


def test_gc_keeps_what_builds_refer_to(home):
    kept = _build(_recipe(name="gc-keep")).artifact
    orphan = stage_dir("convert", "0" * 20)
    orphan.mkdir(parents=True)
    (orphan / "manifest.json").write_text("{}")
    proc = run_cli(home, "gc", "--dry-run")
    assert f"would remove {orphan}" in proc.stdout and str(kept) not in proc.stdout
    run_cli(home, "gc")
    assert not orphan.exists() and kept.exists()


def test_a_local_folder_fetch_logs_its_stage_and_shows_a_bar_while_hashing_its_files(home, tmp_path, monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    src = tmp_path / "model"
    make_random_checkpoint("llama-tiny", 6, src)
    recipe = recipe_from_dict({"model": {"local": str(src)}, "precision": {"dtype": "float32"}}, name="local-bar")
    terminal, lines = Terminal(), []
    monkeypatch.setattr(sys, "stderr", terminal)
    result = Builder(recipe, log=lines.append, show_progress=True).run()
    shown = terminal.getvalue()
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in src.iterdir() if f.suffix in (".safetensors", ".json"))
    assert "hashing the model's files" in shown and f"/{tqdm.format_sizeof(total)} [" in shown, shown  # of bytes
    assert "B/s" in shown, shown  # the rate
    assert any(line.startswith("fetch ") and str(src) in line for line in lines), lines  # the stage line
    digests = read_manifest(result.artifact)["inputs"]["model_files"]
    assert digests["model.safetensors"] == _sha(src / "model.safetensors")  # the bar wraps the hashing
