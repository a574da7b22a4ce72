"""NVIDIA ModelOpt's INT4 AWQ on SmolLM2-135M as the oracle for our int4_awq search (issue 24): the quantizer
TensorRT-LLM's own checkpoints come from, on the same calibration windows, held-out windows and transformers float32
reference as bench/awq_screen.py, so its perplexity is directly comparable with the screen's rows.

    pip install --no-deps --target /tmp/mo nvidia-modelopt omegaconf pulp scipy   # not a project dependency
    PIPELINE_HOME=/tmp/x PYTHONPATH=$PWD:/tmp/mo python bench/awq_modelopt.py [awq_lite|awq_full|plain] ...

ModelOpt fake-quantizes the Hugging Face model in place (int4 values x group scale, activations unquantized): the
same arithmetic as the screen's fake-quantized weights. `plain` is its group-wise int4 without AWQ (max calibration).
"""

from __future__ import annotations

import copy
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from awq_screen import SOURCE, record, setup  # noqa: E402

from pipeline.eval import metrics  # noqa: E402


def quantized(model, calib: list[list[int]], algorithm: str):
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    cfg["algorithm"] = {"awq_lite": "awq_lite", "awq_full": "awq_full", "plain": "max"}[algorithm]

    def forward_loop(m):
        with torch.no_grad():
            for w in calib:
                m(torch.tensor([w]))

    return mtq.quantize(model, cfg, forward_loop)


def main() -> None:
    from transformers import AutoModelForCausalLM

    _, _, calib, held, ref = setup()
    for algorithm in sys.argv[1:] or ["awq_lite"]:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(SOURCE, dtype=torch.float32).eval()
        model = quantized(model, calib, algorithm)
        search_s = time.perf_counter() - start
        with torch.no_grad():
            ours = [model(torch.tensor([w])).logits[0] for w in held]
        m = metrics(ref, ours, held)
        m.update(variant=f"modelopt-{algorithm}", search_seconds=round(search_s, 1))
        record(m)


if __name__ == "__main__":
    main()
