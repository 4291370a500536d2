# Every target creates .venv if absent and installs what it needs. torch is pinned first: a plain
# `torch` would pull a CUDA build; the later installs run under a constraint that holds it there.
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo helloworld test docs lint bench bench-transformers bench-dist bench-venv clean

# The library with its test, transformers, plot and docs extras, and the translation application.
$(VENV)/.installed: pyproject.toml apps/translation/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	echo '$(TORCH)' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e '.[test,transformers,plot,docs]' -e apps/translation
	$(PY) -c "import torch; assert torch.__version__.split('+')[0] == '$(TORCH)'.split('==')[1], torch.__version__"
	touch $@

# The translation demo (apps/translation): corpus, a task-MoE and a dense model trained 1,000 steps each
# side by side, extraction, scores and throughput. Runs land in runs/demo/; a rerun reuses them.
demo: $(VENV)/.installed
	$(VENV)/bin/flexmoe-mt demo

helloworld: $(VENV)/.installed
	$(VENV)/bin/flexmoe helloworld

# Lint, the library's and the application's tests, and the docs site in strict mode (a broken
# link or API reference fails).
test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest
	@# no --quiet: it hides the warnings that --strict counts, and a broken link would pass
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir $(VENV)/site

# The docs site into site/ (open site/index.html); `$(VENV)/bin/mkdocs serve` for live editing.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) benchmarks/layer.py

bench-transformers: $(VENV)/.installed
	$(PY) benchmarks/transformers_moe.py

# Static (r, d, a2a) choices of the distributed layer over a changing workload, 2 ranks on gloo.
bench-dist: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc-per-node 2 benchmarks/distributed.py

# A separate venv with DeepSpeed (CPU, no compiled ops) for the optional benchmark row.
bench-venv:
	test -x .venv-bench/bin/python || python3 -m venv .venv-bench
	.venv-bench/bin/pip install -q $(TORCH)
	DS_BUILD_OPS=0 .venv-bench/bin/pip install -q deepspeed -e .

clean:
	rm -rf $(VENV) .venv-bench build site *.egg-info apps/translation/*.egg-info
