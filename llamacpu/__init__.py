"""llamacpu: run LLaMA-family language models fast on a CPU, with quantized weights.

`llamacpu.load(model)` opens a model for Python use; see `llamacpu.api`.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "Completion", "Sampling", "TokenLogprob", "load", "__version__"]


def __getattr__(name: str):
    # Loaded on first use (PEP 562), so that `import llamacpu.cli` does not pull in numba and the
    # model before the command line is even parsed (startup time, and a clean Ctrl-C during it).
    if name in ("LLM", "Sampling", "TokenLogprob", "load"):
        from . import api
        return getattr(api, name)
    if name == "Completion":
        from .generate import Completion
        return Completion
    raise AttributeError(f"module 'llamacpu' has no attribute {name!r}")
