# Two commands: `make demo` runs the main job on the bundled digits, `make test` runs the tests.
# Each creates .venv from pyproject.toml if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prunebound demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

# Each benchmark prints JSON to stdout; `make bench` collects them in runs/bench/ (~40 min, 2 cores).
BENCH := runs/bench
bench: $(STAMP)
	mkdir -p $(BENCH)
	$(BIN)/python benchmarks/lenet_fashion.py > $(BENCH)/lenet_fashion.json
	$(BIN)/python benchmarks/global_prune.py > $(BENCH)/global_prune.json
	$(BIN)/python benchmarks/certify_speed.py > $(BENCH)/certify_speed.json
	$(BIN)/python benchmarks/hf_prune.py > $(BENCH)/hf_prune.json
	$(BIN)/python benchmarks/verify_speed.py > $(BENCH)/verify_speed.json
	$(BIN)/python benchmarks/sparse_inference.py > $(BENCH)/sparse_inference.json
	$(BIN)/python benchmarks/masked_inference.py > $(BENCH)/masked_inference.json
	$(BIN)/python benchmarks/validity.py --out $(BENCH)/validity > $(BENCH)/validity.json
	$(BIN)/python benchmarks/trained_certify.py --fashion --out $(BENCH)/trained_certify > $(BENCH)/trained_certify.json
	$(BIN)/python benchmarks/sampled_plans.py > $(BENCH)/sampled_plans.json
	$(BIN)/python benchmarks/plan_tightness.py --nets 30 --exact-nets 1 > $(BENCH)/plan_tightness.json
	$(BIN)/python benchmarks/reliability.py --trials 10 > $(BENCH)/reliability.json

clean:
	rm -rf $(VENV) runs .pytest_cache
