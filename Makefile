# deltavault: `make demo` runs the main job, `make test` passes the tests. Both install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test test-fast fuzz lint typecheck system-deps bench bench-deps bench-quick docs clean

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
LOCK := flock /tmp/dv-bench.lock
BLOBS_1M := /tmp/dv-bench-1m-blobs

# The datasets if missing, and the peers.
bench-deps:
	test -f $(DATASETS)/MANIFEST.txt || $(BIN)/python ../shared/bench/make_datasets.py $(DATASETS)
	command -v restic >/dev/null && command -v borg >/dev/null || apt-get install -y -qq restic borgbackup casync bc
	dpkg -s python3-llfuse >/dev/null 2>&1 || apt-get install -y -qq python3-llfuse  # borg mount

# Every benchmark of docs/benchmarks.md with the arguments given there (hours); each takes
# /tmp/dv-bench.lock and measures its peers in the same run. Results: bench/out/*.json, and
# bench/results/*.json for the scale and sparse-volume curves.
bench: system-deps $(STAMP) bench-deps
	$(LOCK) $(BIN)/python bench/files.py --datasets $(DATASETS)
	$(LOCK) $(BIN)/python bench/volume.py --datasets $(DATASETS)
	$(LOCK) $(BIN)/python bench/mount.py --datasets $(DATASETS)
	$(BIN)/python bench/sync.py --datasets $(DATASETS) --update-doc docs/benchmarks.md
	$(LOCK) $(BIN)/python bench/prune_memory.py
	$(LOCK) $(BIN)/python bench/open_index.py --keep $(BLOBS_1M)
	$(LOCK) $(BIN)/python bench/copy_after_backup.py --keep $(BLOBS_1M) --rounds 3
	rm -rf $(BLOBS_1M)
	$(LOCK) $(BIN)/python bench/sftp.py --datasets $(DATASETS)
	$(LOCK) env PYTHONPATH=src:. $(BIN)/python bench/sftp_io.py
	$(LOCK) $(BIN)/python bench/s3.py --datasets $(DATASETS)
	$(LOCK) $(BIN)/python bench/pack_listing.py --packs 1000 10000 100000 --s3-packs 1000 10000 --rounds 3 \
	    --out bench/out/pack_listing.json
	$(BIN)/python bench/sync_remote.py --datasets $(DATASETS)
	$(BIN)/python bench/sync_remote.py --datasets $(DATASETS) --direction pull
	$(LOCK) $(BIN)/python bench/memory.py --datasets $(DATASETS) --src this=src --rounds 4 --scenarios files image incr
	$(LOCK) $(BIN)/python bench/memory.py --datasets $(DATASETS) --src this=src --peers restic --rounds 2 \
	    --scenarios files --repo sftp --out bench/out/memory_sftp.json
	$(LOCK) $(BIN)/python bench/memory.py --datasets $(DATASETS) --src this=src --peers restic --rounds 2 \
	    --scenarios files --repo s3 --out bench/out/memory_s3.json
	$(LOCK) $(BIN)/python bench/sparse_memory.py
	# The headline table (bench-quick's first step) and the restore-only rounds against restic.
	$(LOCK) $(BIN)/python bench/headline.py --datasets $(DATASETS) --rounds 3 --out bench/out/headline.json
	$(LOCK) $(BIN)/python bench/restore_ab.py --datasets $(DATASETS) --src this=src --rounds 5 \
	    --out bench/out/restore_ab.json
	$(LOCK) $(BIN)/python bench/report.py
	$(LOCK) $(BIN)/python bench/scale_snapshots.py --snapshots 100 300 1000 3000 10000 --repeat 3 --peers restic borg \
	    --peer-max 1000 --label curve --plot docs/scale-snapshots.png --clean
	$(LOCK) $(BIN)/python bench/scale_files.py --files 10000 100000 --rounds 3
	$(LOCK) $(BIN)/python bench/scale_files.py --files 1000000 --rounds 1
	$(LOCK) $(BIN)/python bench/index_table.py --blobs 1000000 --rounds 3 --src src --out bench/out/index_table_1m.json
	$(LOCK) $(BIN)/python bench/index_table.py --blobs 10000000 --src src --out bench/out/index_table_10m.json
	$(LOCK) $(BIN)/python bench/scale_blobs.py --build-only --keep --peers --blobs 100000 1000000
	$(LOCK) $(BIN)/python bench/scale_blobs.py --build-only --keep --blobs 10000000
	$(LOCK) $(BIN)/python bench/scale_blobs.py --blobs 100000 1000000 --rounds 3 --keep --warm
	$(LOCK) $(BIN)/python bench/scale_blobs.py --blobs 10000000 --keep --warm
	$(LOCK) $(BIN)/python bench/scale_blobs.py --blobs 100000 1000000 --peers --no-deltavault  # no --keep: the last, it removes the builds
	# sparse_volume.py takes the lock itself around each measured run (under $(LOCK) it would wait on itself).
	$(BIN)/python bench/sparse_volume.py --scenario ext4 --rounds 3 --out bench/results/sparse_volume.json
	$(BIN)/python bench/sparse_volume.py --scenario raw --out bench/results/sparse_volume.json
	$(BIN)/python bench/sparse_volume.py --scenario peers --rounds 3 --peer-timeout 240 --out bench/results/sparse_volume.json
	$(BIN)/python bench/sparse_volume_plot.py --json bench/results/sparse_volume.json --out docs/scale-volume.png
	# restore --volume --verify of the 1 TiB sparse volume (takes the lock itself, as above).
	$(BIN)/python bench/sparse_verify.py --src this=src --timeout 300 --out bench/out/sparse_verify.json

# Issue #18's headline table in one run, under one lock (docs/benchmarks.md, "Reproducing"):
# files-full, files-incr, image-full, image-incr and restore for deltavault, borg and restic,
# 3 rounds interleaved, then one counted round (cold cache: bytes read from the source, written
# to and read from the repository, at their devices: bench/devio.py); then the smallest scale
# points (10k files, 10,000 snapshots).
bench-quick: $(STAMP) bench-deps
	$(LOCK) sh -c '$(BIN)/python bench/headline.py --datasets $(DATASETS) --rounds 3 \
	    --out bench/results/headline.json && \
	  $(BIN)/python bench/scale_files.py --files 10000 --rounds 3 --no-plot \
	    --out bench/results/quick_scale_files.json && \
	  $(BIN)/python bench/scale_snapshots.py --repeat 3 --work /tmp/dv-quick-snapshots \
	    --out bench/results/quick_scale_snapshots.json --label quick; \
	  rc=$$?; rm -rf /tmp/dv-quick-snapshots; exit $$rc'

clean:
	rm -rf $(VENV) demo-work .pytest_cache .mypy_cache .ruff_cache
