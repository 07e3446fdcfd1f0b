# The two commands a newcomer types: `make demo` and `make test`.
# Each creates .venv (stdlib venv) when it is missing and installs everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean strip

$(STAMP): requirements.txt requirements-ray.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-ray.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m mamikit demo --out runs/demo

strip:
	$(PY) -m mamikit strip-notebooks notebooks

clean:
	rm -rf $(VENV) runs demo-data demo-store
