# Two entry points, each doing all set-up on a fresh clone:
#   make demo   -> creates .venv, installs, runs the main job (outputs/demo, or outputs/demo-2, ... if taken; OUT=dir to choose)
#   make test   -> creates .venv, installs, runs nbdev_test over every notebook + pytest tests/
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?=
OFFICIAL ?=
# the C++ kernels are built once per checkout, not in a cache shared with other checkouts
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

# make bench [OFFICIAL=../FastConvMAE]: one pretraining step of Fast ConvMAE-B, timed (beside the official code if given)
.PHONY: demo test install export clean bench reproduce

$(BIN)/.installed: settings.ini setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch torchvision
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/fastconvmae_demo $(if $(OUT),--output $(OUT))

test: $(BIN)/.installed
	cd nbs && ../$(BIN)/nbdev_test --n_workers 1 --do_print
	$(BIN)/python -m pytest -q --durations=30 tests

export: $(BIN)/.installed
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/pretrain_step.py --config base --bs 4 $(if $(OFFICIAL),--official_dir $(OFFICIAL))

# every run of the results chapter (nbs/12_results.ipynb), one at a time; finished steps are skipped
reproduce: $(BIN)/.installed
	$(BIN)/python tools/reproduce.py all

clean:
	rm -rf $(VENV) _proc _docs outputs
