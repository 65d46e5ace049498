# splitspec: `make run` starts the stack and streams a sample; `make test` runs the test suite.
# Both create .venv and install into it. On CPU machines torch is pinned to the CPU build
# (pass TORCH_INDEX=https://download.pytorch.org/whl/cpu where PyPI would hand out CUDA wheels).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PORT ?= 50051
HTTP_PORT ?= 8000
# pytest processes: one per core, at most 4 (the tests are CPU-bound, one torch thread each)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
PROMPT ?= Once upon a time
MODEL_DIR ?= $(SPLITSPEC_MODEL_DIR)
ifneq ($(strip $(MODEL_DIR)),)
TARGET_MODEL ?= $(MODEL_DIR)/tinystories-260k
DRAFT_MODEL ?= $(MODEL_DIR)/tinystories-xs
else
TARGET_MODEL ?= HuggingFaceTB/SmolLM2-360M
DRAFT_MODEL ?= HuggingFaceTB/SmolLM2-135M
endif

.PHONY: install run test proto clean browser

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# Start target + draft + coordinator, stream one sample, keep serving until Ctrl-C.
run: install
	@set -e; log=$$(mktemp); \
	$(BIN)/splitspec up --target "$(TARGET_MODEL)" --draft "$(DRAFT_MODEL)" --port $(PORT) --http-port $(HTTP_PORT) >"$$log" 2>&1 & up=$$!; \
	trap 'kill -TERM $$up 2>/dev/null; wait $$up; rm -f "$$log"' EXIT INT TERM; \
	until grep -q "splitspec is up" "$$log"; do \
	  if ! kill -0 $$up 2>/dev/null; then cat "$$log"; exit 1; fi; sleep 0.5; done; \
	grep "splitspec is up" "$$log"; \
	echo "--- sample (temperature 0.8, k=4):"; printf "%s" "$(PROMPT)"; \
	$(BIN)/splitspec generate --coordinator 127.0.0.1:$(PORT) "$(PROMPT)" --max-tokens 96 --temperature 0.8 --seed 0; \
	if [ -z "$(RUN_ONCE)" ]; then echo "--- serving: playground and OpenAI API at http://127.0.0.1:$(HTTP_PORT), gRPC at 127.0.0.1:$(PORT) (Ctrl-C stops)"; wait $$up; fi

test: install browser
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup

# Debian's Chromium for the playground's browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else echo "make: cannot install chromium (not root, no sudo): the browser test will skip"; exit 0; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Regenerate the committed gRPC stubs after editing proto/ (a test checks they match).
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/splitspec/v1/*.proto

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
