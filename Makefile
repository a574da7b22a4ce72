# Entry points. `make demo` runs the offline default end to end; `make test` runs the test suite.
#   make build RECIPE=gpt2-fp16 ARGS="parallel.tp=2"     build a recipe (ARGS: a.b=value overrides)
#   make run [RECIPE=...] [RUN_ARGS="--prompt hi"]       run a recipe's latest build (default: the latest build of any)
#                                                        on as many ranks as it needs
#   make eval RECIPE=...  /  make bench RECIPE=...       accuracy against HF / speed against transformers
#   make serve RECIPE=... PORT=8000                      OpenAI-compatible server on the ranks the build needs

PYTHON3 ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RECIPE ?= smollm2-135m-bf16-pp2
ARGS ?=
RUN_ARGS ?=
PORT ?= 8000
# Evaluated when a recipe runs (after `setup` may have created the venv): the venv's Open MPI, else the system's.
MPIRUN = $(shell test -x $(VENV)/bin/mpirun && echo $(VENV)/bin/mpirun || echo mpirun)
# Open MPI refuses to start as root without these, and needs --oversubscribe for more ranks than cores.
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export NCCL_NVLS_ENABLE := 0
MPI_FLAGS ?= --oversubscribe

.PHONY: setup demo build run serve test test-all lint eval bench plan lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: setup
	$(PY) -m pipeline.offline smollm2-135m-instruct
	$(PY) -m pipeline build smollm2-135m-bf16-pp2
	$(MPIRUN) -n 2 $(MPI_FLAGS) $(PY) -m pipeline.run

build: setup
	$(PY) -m pipeline build $(RECIPE) $(ARGS)

plan: setup
	$(PY) -m pipeline plan $(RECIPE) $(ARGS)

# RECIPE only when given (its default is the demo's), so a bare `make run` runs the latest build
run: setup
	$(PY) -m pipeline run $(if $(filter command line environment,$(origin RECIPE)),$(RECIPE)) $(RUN_ARGS)

serve: setup
	$(PY) -m pipeline serve $(RECIPE) $(ARGS) --port $(PORT)

eval: setup
	$(PY) -m pipeline eval $(RECIPE) $(ARGS)

bench: setup
	$(PY) -m pipeline bench $(RECIPE) $(ARGS)

# The default run leaves out tests marked slow (real weights, ONNX/TensorRT builds, load tests): test-all runs them.
test: setup
	$(PY) -m pytest -q -x -m "not gpu and not slow"

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

lint: setup
	$(PY) -m ruff check pipeline tests bench

lock: setup
	( head -3 requirements.lock; $(PY) -m pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/' ) > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf checkpoints/fetch checkpoints/convert checkpoints/engine checkpoints/builds checkpoints/latest.json
