# Everything a newcomer runs. Each target sets up what it needs by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SOURCES := api worker shared thoughtwire tests bench

.PHONY: run test check format bench bench-smoke screenshots system-deps clean

run: $(VENV)/.base  ## the embedded gateway on http://127.0.0.1:8000/
	$(BIN)/thoughtwire up

# The frontend and worker integration tests, run again with every fast path off
# (docs/performance.md, "Fast paths"): about 2 minutes on 2 cores. The 4008 test is
# left out there: its "the others get every event" is about the ready-made frames, an
# unpaced 40,000-event burst into a 16-frame queue, which only the fast path keeps up with.
# Of the matrix of what Redis loses at each point of a run, that pass keeps the Redis
# restarts: a lost connection and lost scripts are where the two paths differ, while a
# FLUSHALL or a worker's kill -9 meets the same scripts and processes in both.
PUBLIC_PATH_TESTS := tests/test_fast_paths.py tests/test_streaming.py tests/test_resume.py \
	tests/test_reliability.py tests/test_outages.py tests/test_cluster.py \
	tests/test_embedded.py tests/test_runs_end.py \
	-k "not whatever_redis_loses or restart"

# Most tests wait on real processes rather than compute, so two pytest processes (one
# test file each at a time: a file's fixtures and ports stay its own) halve the time;
# the second pass too.
PARALLEL := -n 2 --dist loadfile

test: $(VENV)/.test system-deps  ## the whole suite, then the integration tests with fast paths off
	$(BIN)/pytest $(PARALLEL)
	THOUGHTWIRE_FAST_PATHS=0 $(BIN)/pytest $(PARALLEL) $(PUBLIC_PATH_TESTS) -q \
		--deselect tests/test_streaming.py::test_a_client_that_stops_reading_is_closed_with_4008_and_nobody_else_waits

screenshots: $(VENV)/.test system-deps  ## the page's screenshots in docs/img (light, dark, 390 px wide)
	SCREENSHOTS_DIR=docs/img $(BIN)/pytest tests/test_page.py -k "test_screenshots or answer_only_link" -q

check: $(VENV)/.test  ## lint, format and type checks
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy

format: $(VENV)/.test
	$(BIN)/ruff check --fix $(SOURCES)
	$(BIN)/ruff format $(SOURCES)

system-deps:  ## redis-server, chromium, npm and kubectl from the OS packages, when missing
	scripts/system-deps

$(VENV)/.base: pyproject.toml
	PYTHON=$(PYTHON) scripts/venv
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.base
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .mypy_cache

bench: $(VENV)/.test system-deps  ## the full benchmark, side by side with peers (minutes)
	$(BIN)/python -m bench.run --out bench/results/latest.json
	$(BIN)/python -m bench.report bench/results/latest.json && cp bench/results/latest.png docs/img/bench.png

bench-smoke: $(VENV)/.test system-deps  ## every system delivers every event (seconds)
	$(BIN)/python -m bench.run --profile smoke --out bench/results/smoke.json
