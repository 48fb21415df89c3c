# cvm-edge: `make demo` and `make test` are the two set-up commands; both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
EXTRAS := train,embed,serve,fleet,offline,dev

.PHONY: demo fleet-demo test lint reliability bench-smoke install constraints clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m cvm_edge.demo --workdir demo_work

# A Flower SuperLink and three SuperNodes on 127.0.0.1, three rounds on the embedded sample (fleet/demo.py)
fleet-demo: $(STAMP)
	$(PY) -m fleet.demo --workdir fleet_demo_work

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# Every reliability test, the 60 s load test included (RELIABILITY.md); their figures replace
# $(RELIABILITY_OUT) only when all pass.
RELIABILITY_OUT ?= bench/results/reliability.json
reliability: $(STAMP)
	rm -f $(RELIABILITY_OUT).new
	CVM_RELIABILITY_RESULTS=$(RELIABILITY_OUT).new $(PY) -m pytest -q -m "reliability or not reliability" tests/integration/test_reliability_*.py
	mv $(RELIABILITY_OUT).new $(RELIABILITY_OUT)

bench-smoke: $(STAMP)
	$(PY) -m bench.run --protocol cifar10-5 --smoke

constraints: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v '^cvm-edge' > constraints.new && mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) demo_work fleet_demo_work .pytest_cache .mypy_cache .ruff_cache
