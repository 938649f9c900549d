"""Quantization recipes (GGUF ladder, ONNX int8, CoreML weight compression)."""
