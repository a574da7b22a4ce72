"""Weight maps, one per family: the only per-architecture knowledge of the converter."""

from pipeline.convert.maps.gpt2 import GPT2_MAP
from pipeline.convert.maps.llama import LLAMA_MAP

WEIGHT_MAPS = {"gpt2": GPT2_MAP, "llama": LLAMA_MAP}
