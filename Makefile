# Every target creates .venv if absent. torch is pinned first: a plain `torch` would pull a CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo helloworld test lint bench bench-venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The translation demo: corpus, a task-MoE and a dense model trained 8 minutes side by side, extraction,
# scores and throughput (about 12-15 minutes on 2 CPU cores). Runs land in runs/demo/.
demo: $(VENV)/.installed
	$(PY) -m flexmoe.models.demo

helloworld: $(VENV)/.installed
	$(PY) -m flexmoe.examples.helloworld

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest tests

bench: $(VENV)/.installed
	$(PY) benchmarks/layer.py

# A separate venv with DeepSpeed (CPU, no compiled ops) for the optional benchmark row.
bench-venv:
	test -x .venv-bench/bin/python || python3 -m venv .venv-bench
	.venv-bench/bin/pip install -q $(TORCH)
	DS_BUILD_OPS=0 .venv-bench/bin/pip install -q deepspeed -e .

clean:
	rm -rf $(VENV) .venv-bench build *.egg-info
