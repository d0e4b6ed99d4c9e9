# deltavault: `make demo` runs the main job, `make test` passes the tests. Both install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test test-fast fuzz lint typecheck system-deps bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*; touch $@

system-deps:
	./scripts/install-system-deps.sh

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# Lint first: CI runs only this target, and a broken layer contract fails it as a test would.
test: system-deps $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not root"

# Fresh random examples, many of them; CI replays a fixed set (tests/conftest.py).
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	DELTAVAULT_HYPOTHESIS=explore DELTAVAULT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_fuzz.py

# ruff, mypy (strict), and import-linter: the one-way layers of docs/architecture.md and no
# import cycle (the contracts are [tool.importlinter] in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The layer diagram of docs/architecture.md, from its Graphviz source.
docs: docs/architecture.svg
docs/architecture.svg: docs/architecture.dot
	dot -Tsvg $< -o $@

DATASETS ?= ../data/ds
# Builds the datasets if missing, installs the peers, then runs every benchmark; each takes
# /tmp/dv-bench.lock and measures its peers in the same run. Results: bench/out/*.json.
bench: system-deps $(STAMP)
	test -f $(DATASETS)/MANIFEST.txt || $(BIN)/python ../shared/bench/make_datasets.py $(DATASETS)
	command -v restic >/dev/null && command -v borg >/dev/null || apt-get install -y -qq restic borgbackup casync bc
	dpkg -s python3-llfuse >/dev/null 2>&1 || apt-get install -y -qq python3-llfuse  # borg mount
	flock /tmp/dv-bench.lock $(BIN)/python bench/files.py --datasets $(DATASETS)
	flock /tmp/dv-bench.lock $(BIN)/python bench/volume.py --datasets $(DATASETS)
	flock /tmp/dv-bench.lock $(BIN)/python bench/mount.py --datasets $(DATASETS)
	$(BIN)/python bench/sync.py --datasets $(DATASETS) --update-doc docs/benchmarks.md
	flock /tmp/dv-bench.lock $(BIN)/python bench/prune_memory.py
	flock /tmp/dv-bench.lock $(BIN)/python bench/open_index.py
	flock /tmp/dv-bench.lock $(BIN)/python bench/sftp.py --datasets $(DATASETS)
	flock /tmp/dv-bench.lock $(BIN)/python bench/s3.py --datasets $(DATASETS)
	$(BIN)/python bench/sync_remote.py --datasets $(DATASETS)
	$(BIN)/python bench/sync_remote.py --datasets $(DATASETS) --direction pull

clean:
	rm -rf $(VENV) demo-work .pytest_cache .mypy_cache .ruff_cache
