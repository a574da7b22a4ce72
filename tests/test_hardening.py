"""Issue 22: bad input meets a clear error (exit 2, no traceback), nothing built is lost, nothing hangs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from pipeline.build import Builder, StageOutput, read_build_record
from pipeline.errors import BuildError, CheckpointError
from pipeline.manifest import read_manifest, verify_folder
from pipeline.params import Limits, SamplingParams, request_problems, text_problems
from pipeline.random_weights import make_random_checkpoint
from pipeline.recipe import recipe_from_dict
from pipeline.safetensors_io import read_header
from pipeline.shapes import SHAPES
from pipeline.storage import Hold, locks_dir
from tests.conftest import PYTHON, REPO, child_env, mpirun, mpirun_binary, run_cli

TINY = {"model": {"random": "gpt2-tiny"}, "precision": {"dtype": "float32"}}


def _build(data: dict, name: str):
    return Builder(recipe_from_dict(data, name=name), log=lambda _: None, show_progress=False).run()


def _run(home: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """One rank, without mpirun (the checks are the same on every rank)."""
    return subprocess.run([PYTHON, "-m", "pipeline.run", *args], cwd=REPO, env=child_env(home),
                          capture_output=True, text=True, timeout=timeout)


def _clean_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "MPI_ABORT" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def tiny(home):
    """gpt2-tiny (vocab 1000, 128 positions) at tp=1, built by recipe 'hard-tiny' with build.max_input_len 64."""
    return _build({**TINY, "build": {"max_input_len": 64}}, "hard-tiny").artifact


@pytest.fixture(scope="module")
def tiny_tp2(home):
    return _build({**TINY, "parallel": {"tp": 2}}, "hard-tiny-tp2").artifact


# ------------------------------------------------------------------------------------- 1. runner flags


# The same checks run in-process in test_engine and test_serve (pipeline.params); the slow cases add the CLI wording.
@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    pytest.param(["--top-p", "0"], "--top-p must be in (0, 1] (1 = no limit), got 0.0", marks=pytest.mark.slow),
    pytest.param(["--top-p", "2"], "--top-p must be in (0, 1] (1 = no limit), got 2.0", marks=pytest.mark.slow),
    (["--top-k", "-5"], "--top-k must be a whole number >= 0 (0 = no limit), got -5"),
    pytest.param(["--max-new-tokens", "-1"], "--max-new-tokens must be a whole number of at least 1, got -1",
                 marks=pytest.mark.slow),
    (["--max-new-tokens", "1000000000"], "plus --max-new-tokens (1000000000) is past the context of 128 tokens; "
                                         "ask for at most 125 new tokens"),
    (["--prompt-ids", "1,2,999999"], "prompt token ids [999999] are outside the vocabulary [0, 1000); give ids "
                                     "below 1000"),
    pytest.param(["--prompt-ids", "1,x"], "--prompt-ids '1,x': give comma-separated whole numbers, e.g. 1,2,3",
                 marks=pytest.mark.slow),
    (["--prompt-ids", ",".join(["5"] * 80)], "the prompt has 80 tokens, more than the build's max_input_len 64; "
                                             "shorten it or rebuild with build.max_input_len=80"),
    (["--prompt-ids", ",".join(["5"] * 200)], "the prompt has 200 tokens, but the model holds 128 positions"),
    pytest.param(["--prompt", ""], "--prompt is empty: give at least one word of text", marks=pytest.mark.slow),
    (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8 (byte 3)"),  # what Python makes of the byte 0xE9
])
def test_runner_flags_are_refused_before_any_weight_loads(home, tiny, flags, expected):
    args = ["--recipe", "hard-tiny", *flags]
    if not any(f.startswith("--prompt") for f in flags):
        args += ["--prompt-ids", "1,2,3"]
    proc = _run(home, *args)
    _clean_error(proc, "error: ", expected)
    assert "backend torch" not in proc.stderr  # stopped before loading


def test_a_non_utf8_prompt_from_the_shell(home, tiny):
    proc = subprocess.run([os.fsencode(PYTHON), b"-m", b"pipeline.run", b"--recipe", b"hard-tiny", b"--prompt",
                           b"caf\xe9"], cwd=REPO, env=child_env(home), capture_output=True, timeout=120)
    assert proc.returncode == 2 and b"--prompt is not valid UTF-8" in proc.stderr and b"Traceback" not in proc.stderr


def test_every_rank_stops_with_one_message_under_mpirun(home, tiny_tp2):
    proc = mpirun(home, 2, "--engine", str(tiny_tp2), "--prompt-ids", "1,2,999999", "--temperature", "-1")
    _clean_error(proc, "--temperature must be a finite number >= 0", "outside the vocabulary [0, 1000)")
    assert proc.stderr.count("error: ") == 1


def test_gpt2_with_1100_prompt_ids_is_past_its_positions():
    limits = Limits.from_config({"vocab_size": 50257, "max_position_embeddings": 1024}, {"max_input_len": None})
    problems = request_problems(SamplingParams(max_tokens=8), [50] * 1100, limits)
    assert problems == ["the prompt has 1100 tokens, but the model holds 1024 positions (prompt and output "
                        "together); shorten the prompt to fewer than 1024 tokens"]
    assert request_problems(SamplingParams(max_tokens=8), [50] * 1000, limits) == []
    assert text_problems(["ok", ""]) == ["prompt [1] is empty: give at least one word of text"]


@pytest.mark.parametrize("override, expected", [
    ("runtime.top_p=0", "runtime.top_p must be in (0, 1] (1 = no limit), got 0.0"),
    ("runtime.top_p=2", "runtime.top_p must be in (0, 1] (1 = no limit), got 2.0"),
    ("runtime.prompts=['']", "runtime.prompts is empty"),
])
def test_the_recipe_runtime_section_is_validated_by_the_same_rules(home, override, expected):
    proc = run_cli(home, "validate", "gpt2-random", override)
    _clean_error(proc, expected)


# ------------------------------------------------------------------------------------- 2. gc and locks


def test_gc_spares_what_a_live_process_holds_and_clears_a_dead_ones(home):
    debris = home / "convert" / f".tmp-held-{uuid.uuid4().hex[:8]}"
    stale = home / "convert" / f".tmp-stale-{uuid.uuid4().hex[:8]}"
    with Hold(debris):  # this test process is the live builder
        debris.mkdir(parents=True)
        stale.mkdir()
        dead = subprocess.Popen(["true"])
        dead.wait()
        lock = locks_dir() / f"{os.uname().nodename}-{dead.pid}.json"
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "paths": [str(stale.resolve())]}))
        proc = run_cli(home, "gc")
        assert proc.returncode == 0, proc.stderr
        assert debris.is_dir() and str(debris) not in proc.stdout
        assert not stale.exists() and f"removed {stale}" in proc.stdout
        assert not lock.exists() and "a lock left by a build that is no longer running" in proc.stdout
    shutil.rmtree(debris)


@pytest.mark.slow
def test_gc_during_a_real_build_removes_nothing_it_uses(home, tmp_path):
    path = tmp_path / "gc-live.yaml"
    path.write_text(json.dumps({"model": {"random": "gpt2", "seed": 22}, "precision": {"dtype": "float16"}}))
    fetch_before = set(os.listdir(home / "fetch")) if (home / "fetch").is_dir() else set()
    convert = home / "convert"
    convert.mkdir(exist_ok=True)
    before = set(os.listdir(convert))
    child = subprocess.Popen([PYTHON, "-m", "pipeline", "build", str(path)], cwd=REPO, env=child_env(home),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, tmp = time.time() + 240, None
        while time.time() < deadline and tmp is None and child.poll() is None:
            tmp = next((p for p in convert.iterdir() if p.name.startswith(".tmp-") and p.name not in before), None)
            time.sleep(0.01)
        assert tmp is not None, "the convert stage never started"
        fresh = [home / "fetch" / n for n in set(os.listdir(home / "fetch")) - fetch_before]
        assert fresh  # made by this build, referred to by no build record yet
        gc = run_cli(home, "gc")
        assert gc.returncode == 0 and str(tmp) not in gc.stdout and all(str(f) not in gc.stdout for f in fresh)
        out, err = child.communicate(timeout=300)
    finally:
        child.kill()
    assert child.returncode == 0, err
    artifact = Path(read_build_record("gc-live")["artifact"])
    assert verify_folder(artifact) == [] and all(f.is_dir() for f in fresh)


# ------------------------------------------------------------------------------------- 3. watchdog


def _rank_pids(tag: str) -> dict[int, int]:
    """The pids of this job's ranks, found by the tag in their environment (only processes this test started)."""
    pids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"HARDEN_TAG={tag}".encode() in env:
            for item in env:
                if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                    pids[int(item.split(b"=")[1])] = int(entry)
    return pids


def _stop_a_rank(home: Path, artifact: Path, rank: int, sig: int) -> tuple[subprocess.CompletedProcess, float]:
    tag = uuid.uuid4().hex
    cmd = [mpirun_binary(), "-n", "2", "--oversubscribe", PYTHON, "-m", "pipeline.run", "--engine", str(artifact),
           "--prompt-ids", "1,2", "--max-new-tokens", "120"]
    job = subprocess.Popen(cmd, cwd=REPO, env=child_env(home, HARDEN_TAG=tag, PIPELINE_WATCHDOG_S="5"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = {}
    try:
        head = []
        for line in job.stderr:  # ranks loaded and generating: 120 steps take seconds on two ranks
            head.append(line)
            if "backend torch" in line:
                break
        pids = _rank_pids(tag)
        os.kill(pids[rank], sig)
        stopped_at = time.monotonic()
        out, err = job.communicate(timeout=90)
        return subprocess.CompletedProcess(cmd, job.returncode, out, "".join(head) + err), time.monotonic() - stopped_at
    finally:
        for pid in [*pids.values(), job.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


BOUND_S = 5 + 2 * 1.0 + 15  # PIPELINE_WATCHDOG_S + two heartbeats + mpirun's teardown on a loaded machine


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_stopped_rank_ends_the_job_naming_it(home, tiny_tp2, rank):
    proc, seconds = _stop_a_rank(home, tiny_tp2, rank, signal.SIGSTOP)
    assert proc.returncode != 0 and seconds < BOUND_S, (seconds, proc.stderr)
    assert f"[watchdog, rank {1 - rank}] rank {rank} (phase: " in proc.stderr
    assert "made no progress for" in proc.stderr and "PIPELINE_WATCHDOG_S=5" in proc.stderr


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_quickly(home, tiny_tp2):
    proc, seconds = _stop_a_rank(home, tiny_tp2, 1, signal.SIGKILL)
    assert proc.returncode != 0 and seconds < BOUND_S, (seconds, proc.stderr)


# ------------------------------------------------------------------------------------- 4. disk full, read-only


def _stage_state(home: Path) -> dict:
    return {stage: sorted(os.listdir(home / stage)) if (home / stage).is_dir() else []
            for stage in ("fetch", "convert")}


def test_a_full_disk_mid_convert_keeps_nothing_of_it_and_loses_nothing_built(home, tiny, monkeypatch):
    from pipeline.safetensors_io import SafetensorsWriter

    record = read_build_record("hard-tiny")
    before = _stage_state(home)
    real = SafetensorsWriter.write_rows

    def write_then_fill_the_disk(self, *args, **kwargs):
        real(self, *args, **kwargs)  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(SafetensorsWriter, "write_rows", write_then_fill_the_disk)
    with pytest.raises(BuildError) as info:
        _build({**TINY, "precision": {"dtype": "float16"}}, "hard-full")
    message = str(info.value)
    assert "the convert stage: the disk of" in message and "is full (it needs about" in message
    assert "python -m pipeline gc" in message
    assert _stage_state(home) == before  # no .tmp-* left, no new folder
    assert read_build_record("hard-tiny") == record and verify_folder(tiny) == []


def test_too_little_free_space_is_refused_before_writing(home, tiny, monkeypatch):
    import pipeline.storage

    before = _stage_state(home)
    monkeypatch.setattr(pipeline.storage.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(BuildError, match=r"the convert stage needs about .* MB in .*convert but its disk has 0.0 MB "
                                         r"free; free space"):
        _build({**TINY, "precision": {"dtype": "bfloat16"}}, "hard-room")
    assert _stage_state(home) == before


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


def test_enospc_on_a_tiny_tmpfs_exits_2_naming_the_folder(tmp_path, recipe_file):
    home = tmp_path / "home"
    home.mkdir()
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", "size=256k", "tmpfs", str(home)):
        pytest.skip("needs root to mount a tmpfs")
    try:
        proc = run_cli(home, "build", str(recipe_file("full", TINY)))
        _clean_error(proc, "the fetch stage: the disk of", "is full", "set PIPELINE_HOME to a larger disk")
        assert [p for p in (home / "fetch").iterdir()] == []  # nothing half-written
    finally:
        _mount("-u", str(home)) or subprocess.run(["umount", str(home)])


def test_a_read_only_checkpoints_folder_exits_2_naming_it(tmp_path, recipe_file):
    """EROFS from a read-only bind mount (root ignores permission bits, so chmod would not do)."""
    home = tmp_path / "home"
    (home / "convert").mkdir(parents=True)
    convert = home / "convert"
    if os.geteuid() != 0 or not _mount("--bind", str(convert), str(convert)):
        pytest.skip("needs root to bind-mount")
    try:
        assert _mount("-o", "remount,bind,ro", str(convert))
        proc = run_cli(home, "build", str(recipe_file("read-only", TINY)))
        _clean_error(proc, "the convert stage:", "is not writable (Read-only file system)",
                     "set PIPELINE_HOME to a writable folder")
        assert os.listdir(convert) == [] and any((home / "fetch").iterdir())  # the fetch before it is kept
    finally:
        subprocess.run(["umount", str(convert)])


# ------------------------------------------------------------------------------------- 5. safetensors offsets


def _rewrite_offsets(path: Path, change) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _two_tensors(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "two.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, path)
    return path


def test_offsets_that_overlap_leave_a_gap_or_run_past_the_end(tmp_path):
    path = _two_tensors(tmp_path)
    _rewrite_offsets(path, lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"]))
    with pytest.raises(CheckpointError, match=r"two.safetensors: tensor '(a|b)' starts at data offset 0, where 16 was "
                                              r"expected: it overlaps the tensor before it"):
        read_header(path)
    path = _two_tensors(tmp_path)
    _rewrite_offsets(path, lambda h: (h["a"].update(data_offsets=[0, 8]), h["a"].update(shape=[2])))
    with pytest.raises(CheckpointError, match="tensor 'b' starts at data offset 16, where 8 was expected: it leaves a "
                                              "gap of 8 bytes"):
        read_header(path)
    path = _two_tensors(tmp_path)
    _rewrite_offsets(path, lambda h: h["b"].update(data_offsets=[16, 40], shape=[6]))
    with pytest.raises(CheckpointError, match="tensor 'b' F32\\[6\\] needs 24 bytes at \\[16, 40\\) but the data "
                                              "section has 32 bytes"):
        read_header(path)


def test_a_build_of_a_file_with_shared_bytes_fails_without_an_artifact(home, tmp_path, recipe_file):
    folder = tmp_path / "hf"
    make_random_checkpoint("gpt2-tiny", 5, folder)
    name0, name1 = "h.0.attn.c_attn.weight", "h.1.attn.c_attn.weight"

    def share(header):
        key0 = next(k for k in header if k.endswith(name0))
        key1 = next(k for k in header if k.endswith(name1))
        header[key1]["data_offsets"] = header[key0]["data_offsets"]

    _rewrite_offsets(folder / "model.safetensors", share)
    before = _stage_state(home)["convert"]
    proc = run_cli(home, "build", str(recipe_file("shared", {"model": {"local": str(folder)}})))
    _clean_error(proc, f"{folder / 'model.safetensors'}: tensor '", "overlaps the tensor before it")
    assert _stage_state(home)["convert"] == before


# ------------------------------------------------------------------------------------- 6. verify


@pytest.mark.parametrize("entry, expected", [
    ("../../etc/hostname", "a path through '..', outside the artifact"),
    ("/etc/hostname", "an absolute path, outside the artifact"),
    ("link", "a symlink leading out of the artifact (to /etc/hostname)"),
])
def test_verify_refuses_manifest_entries_outside_the_artifact(home, tiny, tmp_path, entry, expected):
    import hashlib

    copy = tmp_path / "artifact"
    shutil.copytree(tiny, copy)
    (copy / "link").symlink_to("/etc/hostname")
    manifest = read_manifest(copy)
    manifest["outputs"][entry] = hashlib.sha256(Path("/etc/hostname").read_bytes()).hexdigest()
    if entry != "link":
        manifest["outputs"]["link"] = manifest["outputs"][entry]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = run_cli(home, "verify", str(copy))
    assert proc.returncode == 1 and f"{entry}: {expected}; refused" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------- 7. bench records


@pytest.mark.slow
def test_a_bench_with_overrides_leaves_the_users_build_records(home, tiny):
    _build({**TINY, "build": {"max_input_len": 64}}, "hard-tiny")  # the user's latest build
    record = (home / "builds" / "hard-tiny.json").read_text()
    latest = (home / "latest.json").read_text()
    recipe = home.parent / "hard-tiny.yaml"
    recipe.write_text(json.dumps({**TINY, "build": {"max_input_len": 64}}))
    proc = run_cli(home, "bench", str(recipe), "precision.dtype=float16", "--batch-sizes", "1", "--input-len", "4",
                   "--output-len", "4", "--no-baseline", "--repeats", "1", "--variants", "plain")
    assert proc.returncode in (0, 2), proc.stderr  # however the benchmark itself went
    assert (home / "builds" / "hard-tiny.json").read_text() == record and (home / "latest.json").read_text() == latest
    assert str(tiny) not in run_cli(home, "gc").stdout and verify_folder(tiny) == []


# ------------------------------------------------------------------------------------- 8. what a tester tries next


@pytest.mark.parametrize("text, expected", [
    ("", "model: set exactly one of model.hub, model.local or model.random (found: none)"),
    ("- a\n- b\n", "the top level must be a mapping of sections, found list"),
])
def test_an_empty_recipe_and_a_list_recipe(home, tmp_path, text, expected):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    _clean_error(run_cli(home, "validate", str(path)), expected)


def test_a_recipe_path_that_is_a_folder(home, tmp_path):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    _clean_error(run_cli(home, "validate", str(folder)), f"no recipe '{folder}'")


def test_engine_pointing_at_a_file(home, tiny):
    _clean_error(_run(home, "--engine", str(tiny / "config.json"), "--prompt-ids", "1"),
                 "config.json: a file; give the artifact folder")


def test_a_config_with_a_string_where_a_number_goes(home, tmp_path, recipe_file):
    folder = tmp_path / "hf"
    make_random_checkpoint("gpt2-tiny", 5, folder)
    config = json.loads((folder / "config.json").read_text())
    config["n_head"] = "four"
    (folder / "config.json").write_text(json.dumps(config))
    before = _stage_state(home)["convert"]
    proc = run_cli(home, "build", str(recipe_file("strnum", {"model": {"local": str(folder)}})))
    _clean_error(proc, "the model's config.json: n_head is 'four', expected a number")
    assert _stage_state(home)["convert"] == before


@pytest.mark.slow
def test_ctrl_c_during_a_build_leaves_a_usable_cache(home, tmp_path):
    path = tmp_path / "int.yaml"
    path.write_text(json.dumps({"model": {"random": "llama-tiny", "seed": 44}, "precision": {"dtype": "float16"},
                                "build": {"workers": 1}}))
    convert = home / "convert"
    convert.mkdir(exist_ok=True)
    before = set(os.listdir(convert))
    child = subprocess.Popen([PYTHON, "-m", "pipeline", "build", str(path)], cwd=REPO, env=child_env(home),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and child.poll() is None:
            if any(n.startswith(".tmp-") for n in set(os.listdir(convert)) - before):
                child.send_signal(signal.SIGINT)
                break
            time.sleep(0.002)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    if child.returncode == 0:
        pytest.skip("the convert stage finished before the interrupt landed")
    assert child.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not [n for n in set(os.listdir(convert)) - before if n.startswith(".tmp-")]
    again = run_cli(home, "build", str(path))
    assert again.returncode == 0 and verify_folder(Path(read_build_record("int")["artifact"])) == []


def test_stage_output_is_held_while_it_exists(home):
    final = home / "convert" / f"held-{uuid.uuid4().hex[:8]}"
    with StageOutput(final) as tmp:
        lock = json.loads((locks_dir() / f"{os.uname().nodename}-{os.getpid()}.json").read_text())
        assert str(tmp.resolve()) in lock["paths"] and str(final.resolve()) in lock["paths"]
        (tmp / "manifest.json").write_text("{}")
    assert not (locks_dir() / f"{os.uname().nodename}-{os.getpid()}.json").exists()
    shutil.rmtree(final)


def test_shapes_used_here_exist():
    assert {"gpt2-tiny", "llama-tiny", "gpt2"} <= set(SHAPES)
