# `make forget` sets everything up and runs the main job; `make test` sets up and runs the tests.
PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: setup build forget demo test bench lint data clean

$(STAMP): requirements.txt requirements-dev.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP) build

# Compile gslora._C against the venv's torch (no build isolation: see pyproject.toml).
build: $(STAMP)
	GSLORA_REQUIRE_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .

# The real dataset of the main job (Debian's Fashion-MNIST); needs root, skipped if present.
data:
	@test -d /usr/share/datasets/fashion-mnist || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

forget: setup data
	.venv/bin/gslora forget

demo: forget

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks.run_all

lint: $(STAMP)
	.venv/bin/ruff check gslora tests benchmarks

clean:
	rm -rf build gslora/_C*.so *.egg-info
