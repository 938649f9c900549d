"""transformers' own implementation as the reference for transformers-native versions (MiniCPM-V 4.6): its
processor and `generate`, none of our torch code.

    n_prompt, tokens = native_greedy("MiniCPM-V-4.6", [{"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": "What is this?"}]}], [image], max_new_tokens=32)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def native_processor(folder: str | Path):
    """transformers' `MiniCPMV4_6Processor` for a checkpoint folder (its image processor, tokenizer and chat
    template). Its constructor looks the video processor class up in a registry that is a placeholder without
    torchvision (no CPU wheel here), so that one class check is skipped; images never touch the video processor."""
    from unittest import mock

    from transformers import AutoTokenizer
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
    from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    tok = AutoTokenizer.from_pretrained(folder)
    with mock.patch.object(MiniCPMV4_6Processor, "check_argument_for_proper_class", lambda *a: None):
        return MiniCPMV4_6Processor(image_processor=MiniCPMV4_6ImageProcessorPil.from_pretrained(folder),
                                    video_processor=MiniCPMV4_6VideoProcessor(), tokenizer=tok,
                                    chat_template=tok.chat_template)


def native_model(folder: str | Path):
    """transformers' `MiniCPMV4_6ForConditionalGeneration` of the folder in float32, eval mode."""
    import torch
    from transformers import MiniCPMV4_6ForConditionalGeneration
    return MiniCPMV4_6ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()


def native_greedy(model, processor, messages: Sequence[dict[str, Any]], images: Sequence[Any], *,
                  max_new_tokens: int, downsample_mode: str = "16x", thinking: bool = False) -> tuple[int, list[int]]:
    """(prompt length, greedy answer tokens without the final end-of-generation token) of transformers' own
    processor + `generate`. `messages` in transformers' chat form: image parts are {"type": "image"}, filled
    from `images` in order."""
    import torch
    text = processor.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False,
                                         enable_thinking=thinking)
    inputs = processor(images=list(images) or None, text=[text], return_tensors="pt", downsample_mode=downsample_mode)
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, downsample_mode=downsample_mode)
    tokens = out[0, n:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    while tokens and tokens[-1] in eos:     # the runtime ends on a stop token without returning it
        tokens.pop()
    return n, tokens
