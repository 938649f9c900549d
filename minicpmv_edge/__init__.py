"""minicpmv-edge: export and run MiniCPM-V vision-language models on-device.

Importing this package is cheap: subpackages (export, quantize, runtime) load on demand, and only
`minicpmv_edge.export` / `minicpmv_edge.quantize` may import torch.
"""
__version__ = "0.1.0"
