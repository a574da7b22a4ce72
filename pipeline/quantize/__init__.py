"""Quantization: the math of each format (formats.py), calibration (calibrate.py), the checkpoint side
(checkpoint.py: scales and encoders applied while converting) and the runtime side (runtime.py: the GEMMs the
PyTorch backend runs for each format)."""
