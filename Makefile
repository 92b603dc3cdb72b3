# switchml: `make demo` runs the main job, `make test` the test suite; both set up first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.setup-done
$(VENV)/.setup-done: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(VENV)/bin/switchml-train digits --workers 4 --steps 150 --out runs/demo

test: setup
	bash scripts/test.sh

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/switchml-bench allreduce --workers 4 --size 25MB --backends switchml,gloo --json benchmarks/results/allreduce_loopback.json

clean:
	rm -rf $(VENV) runs .pytest_cache
