"""Workflows: the commands that drive the lower layers end to end (export pipeline, quantization sweep,
benchmark, demo). Nothing in export/, quantize/ or runtime/ imports from here (tests/test_layers.py)."""
