"""The PyTorch backend under real `mpirun` against Hugging Face transformers, over tp and pp combinations.

Each case builds a tiny random checkpoint through the real pipeline (fetch -> convert), runs
`mpirun -n tp*pp python -m pipeline.run` on two prompts of different lengths in one batch, and checks:
- the logits of every prompt position equal transformers' float32 logits within 1e-4;
- the greedy tokens equal transformers' `generate` for each prompt alone (so left padding changes nothing).
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.build import Builder
from pipeline.recipe import recipe_from_dict
from tests.conftest import run_json

PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79], [27, 18, 28]]
NEW_TOKENS = 6


def build(shape: str, tp: int, pp: int):
    recipe = recipe_from_dict({"model": {"random": shape}, "precision": {"dtype": "float32"},
                               "parallel": {"tp": tp, "pp": pp}}, name=f"{shape}-tp{tp}-pp{pp}")
    result = Builder(recipe, log=lambda _: None, show_progress=False).run()
    return result.stages[0].path, result.artifact


@pytest.mark.parametrize("shape, tp, pp", [
    ("gpt2-tiny", 1, 1),
    ("gpt2-tiny", 2, 1),
    ("gpt2-tiny", 2, 2),
    ("llama-tiny", 1, 1),
    ("llama-tiny", 4, 1),  # 8 heads / 2 KV heads on 4 ranks: each KV head replicated twice
    ("llama-tiny", 1, 2),
    pytest.param("llama-tiny", 2, 2, marks=pytest.mark.slow),
    ("llama-tiny-tied", 2, 1),  # tied embeddings, vocab 1001 padded for tp, llama3 rope scaling
])
def test_logits_and_greedy_tokens_match_transformers(home, tmp_path, shape, tp, pp):
    source, artifact = build(shape, tp, pp)
    result = run_json(home, tp * pp, artifact, PROMPTS, tmp_path / "out.json", NEW_TOKENS, tmp_path / "logits.pt")
    ours = torch.load(tmp_path / "logits.pt")
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    for prompt, logits, generated in zip(PROMPTS, ours, result["results"]):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = reference(ids).logits[0]
            greedy = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max().item() < 1e-4
        assert generated["new_ids"] == greedy[0, len(prompt):].tolist()


def test_exit_now_finalizes_mpi_and_keeps_the_exit_code(home):
    """The way out of a stuck NCCL teardown (pipeline.dist.exit_now) must leave mpirun with the ranks' own code:
    0 for a run whose results are written, not Open MPI's 'exited without finalize' failure."""
    import subprocess

    from tests.conftest import PYTHON, child_env, mpirun_binary

    script = ("import sys; from pipeline.dist import exit_now, mpi_world; rank = mpi_world()[0]; "
              "print(f'rank {rank} done', flush=True); exit_now(int(sys.argv[1]))")
    for code in (0, 3):
        proc = subprocess.run([mpirun_binary(), "-n", "2", "--oversubscribe", PYTHON, "-c", script, str(code)],
                              env=child_env(home), capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, proc.stderr[-2000:]
        if code == 0:
            assert sorted(proc.stdout.split("\n")[:2]) == ["rank 0 done", "rank 1 done"]


def test_a_stuck_teardown_is_bounded(monkeypatch, capsys):
    """Comm.close waits at most timeout_s for destroy_process_group (NCCL's can hang after CUDA graph capture) and
    says so; a teardown that finishes returns True."""
    import threading

    import torch.distributed as torch_dist

    from pipeline.dist import Comm
    from pipeline.mapping import Mapping

    comm = Comm(Mapping(2, 1, 1), torch.device("cpu"))
    release = threading.Event()
    calls = []
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch_dist, "destroy_process_group", lambda: (calls.append(1), release.wait(30)))
    assert comm.close(timeout_s=0.3) is False
    assert "[rank 1] the process group's teardown did not finish in 0.3 s" in capsys.readouterr().err
    release.set()
    monkeypatch.setattr(torch_dist, "destroy_process_group", lambda: calls.append(2))
    assert comm.close(timeout_s=5) is True
    assert calls == [1, 2]
