"""pipeline.run_outputs.DecodingTokenizer: a run of token-id prompts decodes its output straight from tokenizer.json
(the `tokenizers` library) instead of importing transformers; its text must be transformers' text."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys

import pytest

from pipeline.run_outputs import DecodingTokenizer, load_tokenizer
from tests.conftest import REPO, child_env


@pytest.mark.parametrize("which", ["gpt2", "smollm2"])
def test_it_decodes_as_transformers_does_and_hands_the_rest_to_it(request, which):
    folder = request.getfixturevalue("gpt2_tokenizer_dir" if which == "gpt2" else "smollm2_dir")
    ours, theirs = DecodingTokenizer.for_folder(folder), load_tokenizer(folder)
    assert ours is not None and ours._full is None
    assert ours.eos_token_id == theirs.eos_token_id
    rng = random.Random(3)
    special = theirs.all_special_ids
    for _ in range(200):  # ordinary ids with special ones among them, and bytes that split a character
        ids = [rng.randrange(len(theirs)) for _ in range(rng.randint(1, 24))] + rng.sample(special, 1)
        rng.shuffle(ids)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert ours._full is None  # decoding never loaded transformers' tokenizer
    text = "The capital of France is"
    assert ours(text).input_ids == theirs(text).input_ids  # the rest is transformers' own
    assert ours.chat_template == theirs.chat_template


def test_a_folder_it_cannot_decode_alike_gets_none(tmp_path, gpt2_tokenizer_dir):
    folder = tmp_path / "tok"
    shutil.copytree(gpt2_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    # a special token the config names but tokenizer.json does not mark special: transformers would skip it
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"additional_special_tokens": ["hello"]}))
    assert DecodingTokenizer.for_folder(folder) is None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert DecodingTokenizer.for_folder(folder) is not None
    (folder / "tokenizer.json").unlink()  # vocab.json and merges.txt only: transformers' tokenizer
    assert DecodingTokenizer.for_folder(folder) is None


def test_a_run_of_token_id_prompts_prints_transformers_text_without_importing_it(home, smollm2_dir, tmp_path):
    from pipeline.build import Builder
    from pipeline.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"local": str(smollm2_dir)}, "precision": {"dtype": "float32"}},
                              name="smollm2-tokenizer-test")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    prompt = [504, 3575, 282, 4649, 314]
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.run", "--engine", str(artifact),
                           "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6", "--json", str(out)],
                          cwd=REPO, env=child_env(home), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = re.findall(r"^import time:.*\|\s+(\S+)\s*$", proc.stderr, re.M)
    assert "torch" in imported and "tokenizers" in imported
    assert "transformers" not in imported
    result = json.loads(out.read_text())["results"][0]
    theirs = load_tokenizer(artifact)
    assert result["text"] == theirs.decode(result["new_ids"], skip_special_tokens=True)
    assert theirs.decode(prompt + result["new_ids"], skip_special_tokens=True) in proc.stdout
