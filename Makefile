# Every target installs what it needs first (Debian 12, as root), so each works from a clean clone.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test unit bench deps deps-core lint clean

deps-core:
	bash scripts/install-deps.sh core

deps:
	bash scripts/install-deps.sh all

demo: deps-core
	$(PY) scripts/demo.py

test: deps
	$(PY) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

unit: deps-core
	$(PY) -m pytest -q -p no:cacheprovider tests/unit $(PYTEST_ARGS)

bench: deps
	$(PY) bench/run.py $(BENCH_ARGS)

# make mutate [MODULE=segment] [MUTATE_ARGS="--rev HEAD --jobs 2"]: mutation testing (mutmut) of the
# core modules against the unit tests, one module at a time (scripts/mutate.py; docs/mutation.md).
.PHONY: mutate
mutate: deps-core
	nice -n 19 $(PY) scripts/mutate.py $(MODULE) $(MUTATE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo-work
