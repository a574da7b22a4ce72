"""`python -m pipeline verify DIR [--run]`: is an artifact still what its manifest says it is?

Without --run: re-hash every file and compare with the manifest (a missing, modified or unlisted file is named).
With --run: also generate greedily for each golden prompt of the artifact's recipe (verify.golden) under mpirun and
compare the tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.build import recipe_for
from pipeline.dist import mpirun_command, mpirun_env
from pipeline.errors import PipelineError
from pipeline.hub import checkpoints_dir
from pipeline.manifest import read_manifest, sha256_file, verify_folder


def check_golden(artifact: Path, manifest: dict) -> list[str]:
    recipe = recipe_for(artifact)
    golden = recipe.get("verify", {}).get("golden", [])
    if not golden:
        return ["the recipe declares no verify.golden outputs; nothing to run"]
    world = recipe["parallel"]["tp"] * recipe["parallel"]["pp"]
    problems = []
    for entry in golden:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.json"
            cmd = mpirun_command(world, ["-m", "pipeline.run", "--engine", str(artifact), "--prompt", entry["prompt"],
                                         "--max-new-tokens", str(len(entry["tokens"])), "--temperature", "0",
                                         "--json", str(out)])
            proc = subprocess.run(cmd, env=mpirun_env(), capture_output=True, text=True)
            if proc.returncode != 0:
                problems.append(f"golden prompt {entry['prompt']!r}: the run failed:\n{proc.stderr[-2000:]}")
                continue
            got = json.loads(out.read_text())["results"][0]["new_ids"]
        expected = list(entry["tokens"])
        if got != expected:
            first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            problems.append(f"golden prompt {entry['prompt']!r}: tokens differ from position {first}: expected "
                            f"{expected}, got {got}")
    return problems


def verify_command(artifact: Path, run: bool = False) -> int:
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise PipelineError(f"{artifact}: no such folder")
    problems = verify_folder(artifact)
    manifest = read_manifest(artifact) or {}
    if run and not problems:
        problems += check_golden(artifact, manifest)
    if problems:
        print(f"{artifact}: does NOT verify", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    count = len(manifest.get("outputs", {}))
    golden = len(recipe_for(artifact).get("verify", {}).get("golden", [])) if run else 0
    print(f"{artifact}: verifies ({count} files match their sha256"
          + (f"; {golden} golden output(s) reproduced" if run else "") + ")")
    return 0


def verify_problem(artifact: Path, rank: int, verify: bool) -> str | None:
    """This rank's objection to running: a missing/corrupt rank file or one that differs from the manifest."""
    from pipeline.backends.torch_backend import rank_file_problem

    problem = rank_file_problem(artifact, rank)
    if problem or not verify:
        return problem
    manifest = read_manifest(artifact)
    if manifest is None or "outputs" not in manifest:
        return (f"{artifact} has no manifest.json, so it cannot be verified; rebuild it with `make build`, "
                f"or pass --no-verify to run it anyway")
    names = [f"rank{rank}.safetensors"] + (["config.json"] if rank == 0 else [])
    for name in names:
        expected = manifest["outputs"].get(name)
        # remembered by (path, size, mtime): a later run of an unchanged file skips re-reading it (16 GB for an
        # 8B model, about 10 s); `python -m pipeline verify` always re-reads every byte
        if expected is None or sha256_file(artifact / name, checkpoints_dir()) != expected:
            return (f"{artifact / name} does not match the sha256 in its manifest (modified or corrupted after the "
                    f"build); rebuild it (make build) or pass --no-verify to run it anyway")
    return None
