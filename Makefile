# Everything a fresh machine needs: only Python 3.10+ and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODELS := .cache/models
MODEL  := $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf
SPM    := $(MODELS)/tokenizer.model.v1
PROMPT ?= What is the capital of France?

.PHONY: venv model run test bench reference check-llamacpp clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,serve,ray]'
	touch $@

venv: $(VENV)/.installed

$(MODEL): | $(VENV)/.installed
	$(PY) -m llamacpu.fetch smollm2 $(MODELS)

$(SPM): | $(VENV)/.installed
	$(PY) -m llamacpu.fetch mistral-spm $(MODELS)

model: $(MODEL) $(SPM)

run: venv model
	$(VENV)/bin/llamacpu run $(MODEL) "$(PROMPT)" --max-tokens 64 --temperature 0

test: venv model
	$(PY) -m pytest -q

# Peers for benchmarks and reference generation (llama-cpp-python compiles for ~15 minutes once).
# llama.cpp is built natively (GGML_NATIVE=ON), as a user here would build it; only features that
# fault in this sandbox (AMX, on some Intel hosts) are left out: see tools/llama_cpp_build.py.
# Rebuilt (uninstall, --no-cache-dir) when those flags change: pip would reuse an older build.
$(VENV)/.peers: $(VENV)/.installed tools/llama_cpp_build.py tools/cc_without_amx.sh
	$(PY) -m pip install --quiet -e '.[test,serve,ray,reference]'
	$(PY) tools/llama_cpp_build.py
	$(PY) -m pip uninstall --quiet -y llama-cpp-python
	CMAKE_ARGS="$$($(PY) tools/llama_cpp_build.py --cmake-args)" \
		$(PY) -m pip install --quiet --no-cache-dir -e '.[bench]'
	touch $@

# Speed and peak memory against llama.cpp at 135M (the real SmolLM2), 1.1B and 7B shapes (random
# weights, made once under .cache/models/bench/ by tools/make_bench_models.py; the 7B needs
# ~4 GB of disk and ~5 GB of RAM). BENCH_ARGS, e.g. BENCH_ARGS="--sizes 135m,1b --repeats 5".
BENCH_ARGS ?=
bench: venv model $(VENV)/.peers
	$(PY) tools/bench_peers.py --model $(MODEL) $(BENCH_ARGS)

reference: venv model $(VENV)/.peers
	$(PY) tools/make_reference.py
	$(PY) tools/make_rope_reference.py --check-llamacpp

# Our q8_0 output loads in llama.cpp with the same greedy tokens; q4_0 quality vs llama.cpp's own.
check-llamacpp: venv model $(VENV)/.peers
	$(PY) tools/check_llamacpp.py
	$(PY) tools/check_llamacpp.py --quality

clean:
	rm -rf $(VENV) .cache
