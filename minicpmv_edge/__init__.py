"""minicpmv-edge: export and run MiniCPM-V vision-language models on-device.

Importing this package is cheap: subpackages (export, quantize, runtime) load on demand, and only
`minicpmv_edge.export` / `minicpmv_edge.quantize` may import torch.
"""
__version__ = "0.1.0"


def load(bundle, **kwargs):
    """Load an exported bundle into a chat-ready model (see `minicpmv_edge.runtime.bundle.load`)."""
    from minicpmv_edge.runtime.bundle import load as _load
    return _load(bundle, **kwargs)
