# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedcohort-installed
STATE ?= .fedcohort

.PHONY: demo test bench ui install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/coordinator demo --state-dir $(STATE) --json $(STATE)/demo_summary.json

test: $(STAMP)
	$(PY) -m pytest -q -rs

bench: $(STAMP)
	$(PY) bench/accuracy_heart.py
	$(PY) bench/he_aggregation.py
	$(PY) bench/he_precision.py
	$(PY) bench/dp_overhead.py
	$(PY) bench/dp_utility.py --jobs 2
	$(PY) bench/audit_throughput.py
	$(PY) bench/round_latency.py
	$(PY) bench/scale.py

ui: $(STAMP)
	$(VENV)/bin/coordinator ui --state-dir $(STATE)

clean:
	rm -rf $(STATE)
