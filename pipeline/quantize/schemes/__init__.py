"""One module per quantization format; pipeline.quantize.registry registers every WeightFormat and KVCacheFormat
defined at module level here. A new format is a new module (see fp8.py for a format that writes scales and
int8_weight_only.py for one that leaves the weights to trtllm-build)."""
