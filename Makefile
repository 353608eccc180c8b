# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint lock bench system-deps clean

# constraints.txt pins every package (and pip itself) to the versions of an environment
# the whole suite passed in; `make lock` re-captures it from .venv after a dependency
# change (local version labels such as +cpu are dropped, so torch==2.13.0 matches the
# CPU build of any index that has it).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt --upgrade pip
	# torch first: 2.13.0 is the CPU build on this machine's disk (unpinned pulls CUDA).
	$(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,files]"
	touch $(STAMP)

lock: $(STAMP)
	{ echo "# pip constraints: make lock (pip freeze of .venv), used by make demo / make test"; \
	  $(BIN)/pip freeze --all --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > constraints.txt

# Debian packages the tests start for real: redis-server (shared rate limits) and
# chromium (the report is opened in a headless browser).
system-deps:
	@if ! command -v redis-server >/dev/null || ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server chromium >/dev/null; \
	  else echo "install redis-server and chromium (Debian packages) for the full suite"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/mlinvert audit --out runs/demo --resume

# Bytecode compiled up front: Python 3.11's compiler is not thread-safe (cpython
# gh-106905, "AST constructor recursion depth mismatch"), and a clean checkout would
# otherwise compile modules on first import inside the lockstep lanes' threads.
test: $(STAMP) system-deps
	$(BIN)/lint-imports --no-cache >/dev/null
	$(BIN)/python -m compileall -q src >/dev/null
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
