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


def open_model(path: str | Path, *, dequantize: bool = False) -> Runtime:
    """Open a GGUF file or HF folder. `dequantize`: run in f32 (the reference path)."""
    t0 = time.perf_counter()
    ckpt = load_checkpoint(path, dequantize=dequantize)
    model = Model(ckpt.config, ckpt.tensors)
    tokenizer = ckpt.tokenizer()
    template = ckpt.chat_template(tokenizer)
    return Runtime(model, tokenizer, template, ckpt, time.perf_counter() - t0)
