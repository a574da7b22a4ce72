"""Hugging Face conventions: a branch or tag is resolved to a commit and the build pinned to it; the standard cache
(HF_HOME) is used, so a model already there builds offline; hints name `hf download`; the reachability check goes
through HTTPS_PROXY."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from pipeline import hub
from pipeline.errors import FetchError
from pipeline.random_weights import make_random_checkpoint
from pipeline.recipe import load_recipe
from tests.conftest import run_cli, write_recipe

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "example-org/tiny-gpt2"


def hub_recipe(folder: Path, revision: str) -> Path:
    return write_recipe(folder, "tiny-hub", {
        "model": {"hub": REPO_ID, "revision": revision},
        "precision": {"dtype": "float32"},
        "build": {"max_input_len": 64, "max_seq_len": None},
    })


@pytest.fixture
def hf_home(tmp_path) -> Path:
    """An HF_HOME laid out as huggingface_hub lays out a download of REPO_ID's main branch at commit SHA."""
    repo = tmp_path / "hf" / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    make_random_checkpoint("gpt2-tiny", 0, repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return tmp_path / "hf"


def test_branch_in_the_standard_cache_builds_offline_pinned_to_its_commit(home, tmp_path, hf_home):
    recipe = hub_recipe(tmp_path, "main")
    proc = run_cli(home, "build", str(recipe), HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"model.revision 'main' of {REPO_ID} is commit {SHA}" in proc.stdout
    assert "this build is pinned to it" in proc.stdout
    record = json.loads((home / "builds" / "tiny-hub.json").read_text())
    assert record["resolved"]["model"]["revision"] == SHA
    fetch = json.loads((home / "fetch" / record["stages"]["fetch"]["key"] / "manifest.json").read_text())
    assert fetch["inputs"]["revision"] == SHA
    assert fetch["snapshot"] == str(hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / SHA)
    # the sha itself gives the same fetch key: one cache entry per commit, however it was named
    again = run_cli(home, "build", str(recipe), f"model.revision={SHA}", HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    assert again.returncode == 0 and "pinned" not in again.stdout, again.stdout + again.stderr
    assert json.loads((home / "builds" / "tiny-hub.json").read_text())["stages"]["fetch"]["key"] == \
        record["stages"]["fetch"]["key"]


def test_uncached_model_offline_names_hf_download(home, tmp_path):
    proc = run_cli(home, "build", str(hub_recipe(tmp_path, "v1.0")), HF_HOME=str(tmp_path / "empty"),
                   HF_HUB_OFFLINE="1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"hf download {REPO_ID} --revision v1.0" in proc.stderr
    assert "huggingface-cli" not in proc.stderr and "Traceback" not in proc.stderr
    assert str(tmp_path / "empty" / "hub") in proc.stderr


def test_tag_is_resolved_on_the_hub_once(tmp_path, monkeypatch):
    asked = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_hub_reachable", lambda timeout_s=3.0: True)
    monkeypatch.setattr(hub, "resolve_on_hub", lambda repo, revision: asked.append((repo, revision)) or SHA)
    lines = []
    pinned = hub.pin_revision(load_recipe(hub_recipe(tmp_path, "v1.0")), log=lines.append)
    assert pinned.model.revision == SHA and asked == [(REPO_ID, "v1.0")]
    assert lines == [f"model.revision 'v1.0' of {REPO_ID} is commit {SHA} (the Hub); this build is pinned to it "
                     f"(write model.revision: {SHA} in the recipe to keep it)"]
    assert hub.pin_revision(pinned, log=lines.append) is pinned and len(lines) == 1  # a sha is left alone


def test_offline_without_a_cached_ref_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nothing"))
    with pytest.raises(FetchError, match="hf download"):
        hub.pin_revision(load_recipe(hub_recipe(tmp_path, "main")))


def test_reachability_check_goes_through_https_proxy(monkeypatch):
    seen = []
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def proxy() -> None:
        conn, _ = server.accept()
        with conn:
            seen.append(conn.recv(200).decode(errors="replace").splitlines()[0])
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=proxy, daemon=True)
    thread.start()
    for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
    assert hub._hub_reachable(timeout_s=5) is False  # the proxy refused the tunnel
    thread.join(timeout=10)
    server.close()
    assert seen and seen[0].startswith("CONNECT huggingface.co:443"), seen
