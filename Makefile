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
# A portable AVX2 build: a native build picks up AMX here, which the sandbox forbids (SIGILL).
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
$(VENV)/.peers: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip install --quiet -e '.[test,serve,ray,reference,bench]'
	touch $@

bench: venv model $(VENV)/.peers
	$(PY) tools/bench_peers.py --model $(MODEL)

reference: venv model $(VENV)/.peers
	$(PY) tools/make_reference.py
	$(PY) tools/make_rope_reference.py --check-llamacpp

# Our q8_0 output loads in llama.cpp with the same greedy tokens; q4_0 quality vs llama.cpp's own.
check-llamacpp: venv model $(VENV)/.peers
	$(PY) tools/check_llamacpp.py
	$(PY) tools/check_llamacpp.py --quality

clean:
	rm -rf $(VENV) .cache
