# Kiln: `make run` starts the whole mesh, `make test` runs every check.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; GPU hosts set TORCH_SPEC (e.g. torch==2.13.0 from a CUDA index).
TORCH_SPEC ?= torch==2.13.0
# Extras: `cpu` = onnxruntime (CPU); GPU hosts use EXTRAS=models,gpu,test (onnxruntime-gpu).
EXTRAS ?= models,cpu,test
# The tts service's own environment: Qwen3-TTS (qwen-tts) pins transformers 4.57.3.
TTS_VENV ?= .venv-tts
TTS_BIN := $(TTS_VENV)/bin
TTS_EXTRAS ?= speech,test
TTS_STAMP := $(TTS_VENV)/.kiln-installed
QWEN_TTS_SPEC ?= qwen-tts==0.1.1
STAMP := $(VENV)/.kiln-installed
TOOLS_STAMP := $(VENV)/.kiln-protoc
PROTOS := $(shell find protos/kiln -name '*.proto')
# Vendored contracts generated into ./kiln too (Envoy's rate limit service: kiln/vendor/envoy/...).
VENDORED_PROTOS := $(shell find protos/third_party/kiln -name '*.proto')

.PHONY: run test gen install lint protolint check clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The protobuf compiler first: the generated package must exist before the
# editable install, or the `kiln` command cannot import it.
$(TOOLS_STAMP): | $(BIN)/python
	$(BIN)/pip install --quiet "grpcio-tools>=1.85,<2" "protobuf>=7.35.1,<8" "googleapis-common-protos>=1.70,<2"
	touch $(TOOLS_STAMP)

$(STAMP): pyproject.toml | kiln/.generated
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# qwen-tts without its declared dependencies: the ones it uses are in the
# `speech` extra; torchaudio (one import, for the unused 25 Hz tokenizer) would
# pull a CUDA build of torch, and gradio is only for its demo.
$(TTS_STAMP): pyproject.toml | kiln/.generated
	test -x $(TTS_BIN)/python || $(PYTHON) -m venv $(TTS_VENV)
	$(TTS_BIN)/python -m pip install --quiet --upgrade pip
	$(TTS_BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(TTS_BIN)/pip install --quiet -e '.[$(TTS_EXTRAS)]'
	$(TTS_BIN)/pip install --quiet --no-deps "$(QWEN_TTS_SPEC)"
	touch $(TTS_STAMP)

install: $(STAMP) $(TTS_STAMP)

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

run: gen $(STAMP) $(TTS_STAMP)
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

test: gen protolint lint $(TTS_STAMP)
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
