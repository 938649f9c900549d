"""llama.cpp's own vision path (clip/mtmd inside llama-cpp-python), driven on an mmproj GGUF.

It is the baseline our runtime is measured against and the project's independent check of the whole
vision path: given an image, it returns the embeddings llama.cpp would put in the LLM, one [query_num, D]
block per slice, in mtmd's order (overview first, then slices row by row). Note that llama.cpp
preprocesses differently from the HF processor (it slices whenever a side exceeds 448, uses its own
bilinear/bicubic resizers and letterboxing), so only images it leaves untouched (448×448 here) can be
compared with the reference embedding for embedding.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from PIL import Image

from minicpmv_edge.errors import MiniCPMVEdgeError

from . import llamacpp_log


class LlamaCppClip:
    """Owns an mtmd context (and the text model mtmd needs to be created against). Close when done."""

    def __init__(self, mmproj: str | Path, llm_gguf: str | Path, *, threads: int = 2):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._lc, self._mtmd = llama_cpp, mtmd_cpp
        llamacpp_log.install()
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.vocab_only = False
        self._model = llama_cpp.llama_model_load_from_file(str(llm_gguf).encode(), mparams)
        if not self._model:
            raise MiniCPMVEdgeError(llamacpp_log.explain(f"{llm_gguf}: llama.cpp could not load this GGUF"))
        cparams = mtmd_cpp.mtmd_context_params_default()
        cparams.use_gpu = False
        cparams.n_threads = threads
        cparams.warmup = False
        cparams.print_timings = False
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise MiniCPMVEdgeError(llamacpp_log.explain(f"{mmproj}: llama.cpp's clip could not load this mmproj"))
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)

    def encode(self, image: Image.Image) -> list[np.ndarray]:
        """Embeddings of every image chunk mtmd makes for `image`: a list of [n_tokens, D] float32 arrays."""
        m = self._mtmd
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        bitmap = m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0],
                                    rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte)))
        chunks = m.mtmd_input_chunks_init()
        try:
            text = m.mtmd_default_marker()
            inp = m.mtmd_input_text(text, len(text), False, True)
            bitmaps = (ctypes.c_void_p * 1)(bitmap)
            rc = m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(inp), bitmaps, 1)
            if rc != 0:
                raise MiniCPMVEdgeError(f"llama.cpp's mtmd could not tokenize the image (code {rc})")
            out = []
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = m.mtmd_input_chunk_get_n_tokens(chunk)
                if m.mtmd_encode_chunk(self._ctx, chunk) != 0:
                    raise MiniCPMVEdgeError("llama.cpp's clip failed to encode an image slice")
                ptr = m.mtmd_get_output_embd(self._ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(n, self.n_embd)).copy())
            return out
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            self._lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaCppClip":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
