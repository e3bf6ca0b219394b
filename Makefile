# Every install step of the project lives here; CI (.ci/run) calls `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONFIG ?= experiments/quick.yaml

.PHONY: install test lint verify demo collections clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

collections: install
	$(PY) -m pyterrier_kdcl.offline.datasets build

lint: install
	$(VENV)/bin/ruff check .

test: install collections lint verify
	$(PY) -m pytest -q tests

verify: install
	# every committed report that has its per-query evidence must reproduce from it, and every number that
	# prose quotes as a link to a table row must match the row (docs/results/README.md, "Claims")
	# (a run is a directory with its report.md; collection-baselines holds evidence and claims, not a report)
	$(VENV)/bin/kdcl verify $(filter $(patsubst %/report.md,%,$(wildcard docs/results/*/report.md)),\
		$(patsubst %/perquery.csv.gz,%,$(wildcard docs/results/*/perquery.csv.gz))) \
		README.md docs/*.md docs/results/README.md docs/results/dose-response/README.md \
		docs/results/collection-baselines/README.md $(wildcard docs/results/*-interpolated/README.md)

demo: install collections
	$(VENV)/bin/kdcl experiment $(CONFIG)

clean:
	rm -rf $(VENV) build *.egg-info
