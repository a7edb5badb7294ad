# Quick start: `make demo` runs a default search end-to-end; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.xtalforge-installed

.PHONY: demo test test-dft bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# CPU build of PyTorch first: a bare `torch` requirement would pull the CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xtalforge search examples/demo.toml --out demo-run
	$(VENV)/bin/xtalforge report demo-run
	@echo "Report: $(CURDIR)/demo-run/report.html"

test: $(STAMP)
	$(PY) -m pytest -m "not dft" -q

# Real DFT: Debian's libxc/OpenBLAS/PAW setups, then GPAW built against them.
test-dft: $(STAMP)
	apt-get update -qq && apt-get install -y -qq libxc-dev libopenblas-dev gpaw-data
	CC=g++ $(PY) -m pip install --quiet -e '.[dft,test]'
	$(PY) -m pytest -m dft -q -rs

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-run
