# One command each: `make demo` (set up, then run the main example job) and `make test`.
# Both create ./.venv on first use. torch is pinned so that a CPU-only machine takes the
# CPU build; on a GPU machine `pip install torch` with your CUDA build instead.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint clean-demo

$(BIN)/orch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[test]"
	touch $(BIN)/orch

setup: $(BIN)/orch

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/orch submit --wait jobs/t5_summarize.yaml

lint: setup
	$(BIN)/ruff check orchestrator workers tests bench jobs

# pytest exits 5 when it collected no tests: that is a failure here, never a pass.
# Two test processes (pytest-xdist): one runs every test of the session's Ray cluster
# (tests/conftest.py groups them), the other the rest meanwhile.
TEST_PROCESSES ?= 2
# compileall: bytecode for orch's own modules. The tests start hundreds of CLI processes,
# and where PYTHONDONTWRITEBYTECODE is set each would compile them from source again.
test: setup
	$(BIN)/python -m compileall -q orchestrator workers
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15 \
	  -n $(TEST_PROCESSES) --dist loadgroup --no-loadscope-reorder; \
	  rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc
