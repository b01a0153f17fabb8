"""llamacpu: run LLaMA-family language models fast on a CPU, with quantized weights.

`llamacpu.load(model)` opens a model for Python use; see `llamacpu.api`.
"""

__version__ = "0.1.0"

from .api import LLM, Sampling, TokenLogprob, load  # noqa: E402  (after __version__, which setup tools read)
from .generate import Completion  # noqa: E402

__all__ = ["LLM", "Completion", "Sampling", "TokenLogprob", "load", "__version__"]
