"""llamacpu: run LLaMA-family language models fast on a CPU, with quantized weights."""

__version__ = "0.1.0"
