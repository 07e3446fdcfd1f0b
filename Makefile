# The two commands a newcomer types: `make demo` and `make test`.
# Each creates .venv (stdlib venv) when it is missing and installs everything
# (requirements-dev.txt: the library, the demo and pytest).
# `make test` also runs the smoke tests against the lowest versions that
# requirements.txt allows, in a second venv (.venv-lowest, requirements-lowest.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOWEST := .venv-lowest
LOWEST_PY := $(LOWEST)/bin/python
LOWEST_STAMP := $(LOWEST)/.installed
REQUIREMENTS := requirements.txt requirements-demo.txt requirements-dev.txt pyproject.toml

.PHONY: demo test test-lowest install clean strip fixtures

$(STAMP): $(REQUIREMENTS) requirements-ray.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -r requirements-ray.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

$(LOWEST_STAMP): $(REQUIREMENTS) requirements-lowest.txt
	test -x $(LOWEST_PY) || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST_PY) -m pip install --quiet --upgrade pip
	$(LOWEST_PY) -m pip install --quiet -r requirements-dev.txt -c requirements-lowest.txt
	$(LOWEST_PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(LOWEST_STAMP)

install: $(STAMP)

test: $(STAMP) $(LOWEST_STAMP)
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-lowest

# The tests marked `smoke` (pyproject.toml) on the lowest supported versions.
test-lowest: $(LOWEST_STAMP)
	$(LOWEST_PY) -m pytest -q -m smoke -p no:cacheprovider

# Rewrite the stored forward-pass outputs of tests/test_regression.py, only when a change of the numbers is meant.
fixtures: $(STAMP)
	$(PY) -m tests.regression_cases --write

demo: $(STAMP)
	$(PY) -m mamikit demo --out runs/demo

strip:
	$(PY) -m mamikit strip-notebooks notebooks

clean:
	rm -rf $(VENV) $(LOWEST) runs demo-data demo-store
