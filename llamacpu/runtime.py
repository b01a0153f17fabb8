"""An opened model, ready to generate: weights, tokenizer and chat template from one path."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint, load_checkpoint
from .config import ModelConfig
from .model import Model


@dataclass
class Runtime:
    model: Model
    tokenizer: object  # llamacpu.tokenizer.Tokenizer
    template: object | None  # llamacpu.template.ChatTemplate, None when the model has none
    checkpoint: Checkpoint
    load_seconds: float

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def open_model(path: str | Path, *, dequantize: bool = False, quant: str | None = None,
               threads: int | None = None, act_bits: int | None = None) -> Runtime:
    """Open a GGUF file or HF folder.

    dequantize: every weight as f32 (the reference path).
    quant: quantize matrices to this format at load (for HF folders, whose weights are
        float; a GGUF already in that format is used as is). None keeps what the file has,
        except that HF folders are quantized to q8_0. 4-bit scales are searched with the
        weights-only importance (no self-calibration at load; `convert` does that).
    threads: kernel threads (None: all available cores).
    act_bits: activation bits of the integer kernels, 16 or 8; None: by weight format (see `Model`).
    """
    t0 = time.perf_counter()
    ckpt = load_checkpoint(path, dequantize=dequantize)
    if quant is None and ckpt.hf_dir is not None and not dequantize:
        quant = "q8_0"
    if quant is not None and not dequantize:
        from .convert import quantize_checkpoint
        # No self-calibration here: it would silently sample ~1k tokens in f32 at every load
        # (about 12 s at 135M). The 4-bit search takes its weights-only importance instead;
        # `llamacpu convert` calibrates, once.
        ckpt = quantize_checkpoint(ckpt, quant, calibrate=False)
    model = Model(ckpt.config, ckpt.tensors, threads=threads, act_bits=act_bits)
    tokenizer = ckpt.tokenizer()
    template = ckpt.chat_template(tokenizer)
    return Runtime(model, tokenizer, template, ckpt, time.perf_counter() - t0)
