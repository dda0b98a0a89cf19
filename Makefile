# sf2dist: `make test` and (from the training issue on) `make demo` do all the set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Which torch build `make install` puts into .venv: TORCH=cpu (the default) or a CUDA build named
# by PyTorch's wheel index, e.g. `make install TORCH=cu126`. A torch already in .venv is kept
# unless TORCH is given on the command line and names another build. Decide it here, not by
# what the machine running make has: a venv built on a GPU-less login node serves GPU jobs.
TORCH ?= cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH)

.PHONY: install torch test demo demo-data bench-data bench-convert bench-stream bench-checkpoint scaling-bench bench-head-storage bench-models gpu-check reproduce clean

install: $(VENV)/.installed

# The torch check runs every time: `make install TORCH=cu126` on a CPU venv switches it.
$(VENV)/.installed: pyproject.toml Makefile FORCE_TORCH_CHECK
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(MAKE) --no-print-directory torch
	@# The dependencies must keep the torch build chosen above: one that pulls torchvision or an
	@# unpinned torch can make pip replace a CPU build with gigabytes of CUDA libraries.
	@before=$$($(PY) -c "import torch; print(torch.__version__)"); \
	test -f $@ -a $@ -nt pyproject.toml -a $@ -nt Makefile || $(PY) -m pip install -q -e ".[deepspeed,dev]" || exit 1; \
	after=$$($(PY) -c "import torch; print(torch.__version__)"); \
	if [ "$$before" != "$$after" ]; then \
	  echo "make install: installing sf2dist's dependencies replaced torch $$before with $$after; a dependency pins or upgrades torch. Find it with '$(PY) -m pip show torch' (Required-by), then run make install TORCH=... to put the wanted build back" >&2; \
	  exit 1; \
	fi
	@touch $@
.PHONY: FORCE_TORCH_CHECK

# torch into .venv: kept if present (and TORCH not given on the command line), else the build
# TORCH names. The CPU build comes from a local "+cpu" wheel if pip finds one, else the CPU index.
torch:
	@have=$$($(PY) -c "import torch; print('cpu' if torch.version.cuda is None else 'cu' + torch.version.cuda.replace('.', ''))" 2>/dev/null); \
	if [ -n "$$have" ] && { [ "$(origin TORCH)" = file ] || [ "$$have" = "$(TORCH)" ]; }; then \
	  exit 0; \
	fi; \
	echo "installing torch $(TORCH_VERSION), $(TORCH) build$${have:+ (replacing the $$have build)}"; \
	if [ "$(TORCH)" = cpu ]; then \
	  $(PY) -m pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
	    || $(PY) -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX); \
	else \
	  $(PY) -m pip install -q --force-reinstall --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX) \
	    && $(PY) -m pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX); \
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

# sf2dist-convert images/s at 1 and 2 workers on synthetic faces, and the listing of 200,000
# identity folders; writes the convert section of docs/benchmarks.md. About 4-7 minutes.
bench-convert: install
	$(PY) launch/bench_convert.py --out docs/benchmarks.md

# Streaming loader over HTTP (Debian's nginx on 127.0.0.1, tests/nginx.sh) against the local
# random-access loader, per core; writes the stream section of docs/benchmarks.md. About 1 minute.
bench-stream: install
	$(PY) launch/bench_stream.py --out docs/benchmarks.md

# Checkpoint save/load seconds of a 1M-class head shard, to choose run.checkpoint_every; writes docs/benchmarks.md.
BENCH_CHECKPOINT_ARGS ?=
bench-checkpoint: install
	$(PY) launch/bench_checkpoint.py --docs docs/benchmarks.md $(BENCH_CHECKPOINT_ARGS)

# Classifier-layer images/s against world size, SphereFace2 beside the softmax baselines, timed
# in interleaved rounds (ratios with their spread); writes runs/scaling-bench/ (CSV, JSON, PNG)
# and the tables into docs/benchmarks.md. About 8 minutes on 2 cores.
scaling-bench: install
	$(PY) launch/scaling_bench.py --docs docs/benchmarks.md $(SCALING_ARGS)

# Accuracy of the demo with the head's rows stepped separately, fused, and stored in bfloat16
# (three 2-process CPU trainings, about 4 minutes each); writes docs/benchmarks.md.
bench-head-storage: install demo-data
	$(PY) launch/bench_head_storage.py --data $(DEMO_DATA) --docs docs/benchmarks.md

# Every registered network: parameters, PyTorch and ONNX time per image on this CPU, the ONNX
# export checked against PyTorch (weights over 1.5 GiB in a .onnx.data sidecar) and whether
# insightface's model zoo takes the file; writes docs/benchmarks.md. The ViT-L and ViT-H take
# minutes each and vit_h some 12 GB of memory; BENCH_MODELS_ARGS="--only r18,mbf" runs a subset.
BENCH_MODELS_ARGS ?=
bench-models: install
	$(PY) launch/bench_models.py --out docs/benchmarks.md $(BENCH_MODELS_ARGS)

# On a machine with NVIDIA GPUs (and `make install TORCH=cu126` or your own CUDA torch): the CUDA
# tests, host syncs per step, end-to-end and head speed at 1M identities, the largest head per
# GPU, and the NCCL scaling bench on 2+ GPUs; about 8 minutes on one GPU. Writes
# runs/gpu-check/report.json and the GPU section of docs/benchmarks.md.
gpu-check: install
	$(PY) launch/gpu_check.py --out-dir runs/gpu-check --docs docs/benchmarks.md

# The paper's loss comparison, ablation and label-noise experiments on held-out synthetic
# identities (launch/reproduce.py, CPU profile: 2,000 steps per run, 5 seeds, 92.5 minutes
# measured on 2 cores); writes runs/reproduce/ and docs/results.md. Re-running resumes: finished
# runs are skipped. REPRODUCE_ARGS="--profile quick --out runs/reproduce-quick" is the 45-minute look.
REPRODUCE_ARGS ?=
reproduce: install
	$(PY) launch/reproduce.py --profile cpu --experiment all $(REPRODUCE_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
