# Two entry points on a fresh machine: `make demo` (main job on the synthetic default) and `make test`.
PY ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick install clean

# --no-cache-dir: the CUDA build of torch and its nvidia wheels take ~6 GB installed; a second copy in
# pip's cache can fill a small disk.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --no-cache-dir --upgrade pip
	$(VENV)/bin/pip install --no-cache-dir -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole workflow on the synthetic data: generate it, import its Xeno-canto-like archive for the
# minority classes (external_data/xeno_canto), teacher + ROUNDS student rounds (each with its
# equal-compute control), ONNX export, submission.csv for the validation soundscapes. EXPERIMENT picks the
# preset (configs/experiment/demo.yaml: the default recipe with shorter student rounds).
ROUNDS ?= 2
EXPERIMENT ?= demo
demo: $(STAMP)
	$(VENV)/bin/birdrounds synth experiment=$(EXPERIMENT) $(ARGS)
	$(VENV)/bin/birdrounds xc-download experiment=$(EXPERIMENT) 'xc.source=$${data.root}/xc_archive' $(ARGS)
	$(VENV)/bin/python rounds/run.py experiment=$(EXPERIMENT) round=$(ROUNDS) control=true $(ARGS)
	$(VENV)/bin/birdrounds export experiment=$(EXPERIMENT) $(ARGS)
	$(VENV)/bin/birdrounds predict experiment=$(EXPERIMENT) $(ARGS)

# --durations=20: CI's log names the 20 slowest tests (and fixtures), so a slow one is seen when it lands.
# -n: one pytest-xdist worker per CPU core, at most 4 (most slow tests wait on subprocesses that use one
# core); the shared fixtures are built once for all workers (tests/conftest.py). ARGS="-n 0" runs serially.
# --dist worksteal: a worker that runs out of tests takes queued ones from the other, so the suite does not
# end on one worker's tail of long end-to-end tests.
XDIST := -n auto --maxprocesses 4 --dist worksteal
test: $(STAMP)
	$(VENV)/bin/python -m pytest tests $(XDIST) --durations=20 $(ARGS)

test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest tests $(XDIST) -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) runs data

# docs/results.md from the benchmark records in results/*.json (bench/render_results.py; Python's
# standard library only, so no install is needed).
.PHONY: results
results:
	$(PY) bench/render_results.py
