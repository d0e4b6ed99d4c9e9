# deltavault: `make demo` runs the main job, `make test` passes the tests. Both install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test test-fast lint typecheck system-deps bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $@

system-deps:
	./scripts/install-system-deps.sh

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

test: system-deps $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not root"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy

bench: system-deps $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) demo-work .pytest_cache .mypy_cache .ruff_cache
