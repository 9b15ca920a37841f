# make test      set up everything (like ./serve.sh) and run the whole test suite
# make unit      unit tests only (no TorchServe)
# make serve     ./serve.sh (foreground)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test unit e2e setup serve stop help

help:
	@sed -n '1,3p' Makefile

setup:
	./serve.sh --install
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) scripts/download_model.py --model tiny.en

test: setup
	$(PY) -m pytest tests -ra

unit: setup
	$(PY) -m pytest tests/unit -ra

e2e: setup
	$(PY) -m pytest tests/e2e -ra

serve:
	./serve.sh

stop:
	./serve.sh --stop
