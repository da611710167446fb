# caffe2torch: every target only calls the project's own entry points.
# `make <target> PYTHON=python3` skips the virtualenv and uses that interpreter as is
# (the GPU machine has no network and cannot build one).

BOOTSTRAP_PYTHON ?= python3
VENV ?= .venv
ifeq ($(origin PYTHON),undefined)
  PY := $(VENV)/bin/python
  SETUP := $(VENV)/.installed
else
  PY := $(PYTHON)
  SETUP :=
endif
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

# Conversion (issue: convert the DeepLab-v2 Caffe models).
CAFFEMODEL ?= data/train_iter_20000.caffemodel
PROTOTXT ?=
OUT ?= build/checkpoints/$(basename $(notdir $(CAFFEMODEL)))
SURGERY ?= auto
CLASSES ?= 21

# Parity (issue: prove parity layer by layer).
CHECKPOINT ?= build/demo/voc12
REFERENCE ?=
IMAGE ?=
DEVICE ?= cpu

DEMO := build/demo
DEMO_CONFIG ?= resnet101

.PHONY: help setup convert demo test test-all verify-parity reference-opencv bench-convert bench-verify caffe-image caffe-blobs clean

help:
	@echo "make demo                 whole pipeline on synthetic DeepLab-v2 caffemodels (creates .venv)"
	@echo "make test                 the test suite"
	@echo "make convert CAFFEMODEL=... [PROTOTXT=...] OUT=<folder> [SURGERY=auto|off] [CLASSES=21]"
	@echo "make verify-parity CHECKPOINT=<folder> [REFERENCE=ref.h5] [PROTOTXT=... CAFFEMODEL=...] [IMAGE=...] [DEVICE=cpu|cuda]"
	@echo "make bench-convert | bench-verify | caffe-image | caffe-blobs"

setup: $(SETUP)

$(VENV)/.installed: pyproject.toml
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

convert: $(SETUP)
	$(PY) -m converter convert --caffemodel "$(CAFFEMODEL)" $(if $(PROTOTXT),--prototxt "$(PROTOTXT)") \
		--out "$(OUT)" --surgery $(SURGERY) --classes $(CLASSES)

test: $(SETUP)
	$(PY) -m pytest -q

test-all: $(SETUP)
	$(PY) -m pytest -q -m ""

clean:
	rm -rf build
