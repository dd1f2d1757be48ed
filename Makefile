# Two commands: `make demo` runs the main job on the bundled digits, `make test` runs the tests.
# Each creates .venv from pyproject.toml if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-long clean

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

# Each benchmark prints JSON to stdout; `make bench` collects them in runs/bench/ (~40 min, 2 cores);
# `make bench-long` adds the multi-hour ones (certified compression, structured accuracy).
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

bench-long: $(STAMP)
	mkdir -p $(BENCH)
	$(BIN)/python benchmarks/certified_compression.py --models lenet_300_100,lenet5 --methods obs,magnitude --modes distill,oneshot > $(BENCH)/certified_compression.json
	$(BIN)/python benchmarks/fidelity_recipes.py > $(BENCH)/fidelity_recipes.jsonl
	$(BIN)/python benchmarks/structured.py --ratios 0.3,0.5,0.7 > $(BENCH)/structured.json
	$(BIN)/python benchmarks/structured.py --accuracy > $(BENCH)/structured_accuracy.json

clean:
	rm -rf $(VENV) runs .pytest_cache
