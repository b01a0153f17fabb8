"""llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`), for the tools that make
or compare files with it: make_bench_models.py, make_kquant_reference.py, check_kquants.py and
check_llamacpp.py (`tools/` is on the path when they run as scripts).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def llama_cpp_quantize(src: Path, out: Path, fmt: str, *, threads: int = 2, pure: bool = False,
                       requantize: bool = False) -> float:
    """Quantize the GGUF `src` to `out` as `fmt` (llama.cpp's LLAMA_FTYPE_MOSTLY_<FMT>, e.g. "Q4_0",
    "q4_k_m"), llama.cpp's default parameters otherwise (no imatrix; its per-tensor mixture unless
    `pure`). requantize: allow a block-quantized source (Q8_0, Q4_1). Written to `out`.tmp and
    renamed, so a failed run leaves no partial file; exits with a message if llama.cpp fails.
    Returns the seconds taken."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt.upper()}")
    params.nthread = threads
    params.pure = pure
    params.allow_requantize = requantize
    tmp = out.with_name(out.name + ".tmp")
    t0 = time.perf_counter()
    try:
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            sys.exit(f"llama.cpp could not quantize {src} to {fmt}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return time.perf_counter() - t0
