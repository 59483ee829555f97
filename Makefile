# Two commands do everything on a fresh machine:
#   make repro   set up, then rebuild the whole pipeline on the embedded default (dvc repro)
#   make test    set up, then run the unit tests and the notebooks (nbval)
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)  # the stages call papermill from the environment

.PHONY: setup repro test
setup:
	@VENV=$(VENV) bash .ci/setup

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/pytest
