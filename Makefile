# The two commands: `make demo` and `make test`. Both create .venv when it is missing and
# reinstall only when a requirement file changes (the stamp is keyed by their hash).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HASH   := $(shell cat requirements/*.txt pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
STAMP  := $(VENV)/.installed-$(HASH)
DEMO   ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test env bench clean-demo
env: $(STAMP)

$(STAMP):
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(STAMP)

demo: $(STAMP)
	$(PY) -m beitfast.demo --out $(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_masking.py

clean-demo:
	rm -rf $(DEMO)
