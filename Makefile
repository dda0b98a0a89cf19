# sf2dist: `make test` and (from the training issue on) `make demo` do all the set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Where a CPU-only machine gets its torch when no local CPU wheel is found.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install torch test demo demo-data bench-data scaling-bench bench-head-storage clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(MAKE) --no-print-directory torch
	$(PY) -m pip install -q -e ".[deepspeed,dev]"
	touch $@

# With CUDA present, the user's own CUDA build (or PyPI's default one); without, only a CPU
# build: a "+cpu" wheel if pip can find one, else the CPU index. Never a multi-GB CUDA build.
torch:
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "CUDA found: installing torch from the default index"; \
	  $(PY) -m pip install -q "torch>=2.1"; \
	else \
	  echo "No CUDA: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	    || $(PY) -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi

test: install
	$(PY) -m pytest -q

# The main job on a CPU: synthetic identities, 2-process gloo training of a small CNN with
# the SphereFace2 head, verification on held-out identities, a printed accuracy and a plot.
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
DEMO_SYNTH ?= --identities 500 --images-per-identity 20 --holdout-identities 200 --pairs 3000 --size 112
demo: install demo-data
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 \
	  launch/train.py --config configs/demo_cpu.yaml --set data.train=$(DEMO_DATA)/train \
	  --set "eval.benchmarks=[$(DEMO_DATA)/holdout.bin]" --set run.dir=$(DEMO_RUN)

demo-data: install
	@test -f $(DEMO_DATA)/train/manifest.json -a -f $(DEMO_DATA)/holdout.bin \
	  || $(VENV)/bin/sf2dist-synth $(DEMO_SYNTH) --out $(DEMO_DATA) --overwrite

# Decode + augment throughput of the loader, per core; writes docs/benchmarks.md.
bench-data: install
	$(PY) launch/bench_data.py --out docs/benchmarks.md

# Classifier-layer images/s against world size, SphereFace2 beside the softmax baselines;
# writes runs/scaling-bench/ (CSV, JSON, PNG) and the table into docs/benchmarks.md.
scaling-bench: install
	$(PY) launch/scaling_bench.py --docs docs/benchmarks.md $(SCALING_ARGS)

# Accuracy of the demo with the head's rows stepped separately, fused, and stored in bfloat16
# (three 2-process CPU trainings, about 4 minutes each); writes docs/benchmarks.md.
bench-head-storage: install demo-data
	$(PY) launch/bench_head_storage.py --data $(DEMO_DATA) --docs docs/benchmarks.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
