# Every target creates .venv if absent. torch is pinned first: a plain `torch` would pull a CUDA build.
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo helloworld test lint bench bench-transformers bench-dist bench-venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	@# the transformers and plot extras, with torch held at the pinned version (the constraint forbids an upgrade)
	echo '$(TORCH)' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e '.[test,transformers,plot]'
	$(PY) -c "import torch; assert torch.__version__.split('+')[0] == '$(TORCH)'.split('==')[1], torch.__version__"
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

bench-transformers: $(VENV)/.installed
	$(PY) benchmarks/transformers_moe.py
# Static (r, d, a2a) choices of the distributed layer over a changing workload, 2 ranks on gloo.
.PHONY: bench-dist
bench-dist: $(VENV)/.installed
	$(VENV)/bin/torchrun --nproc-per-node 2 benchmarks/distributed.py

# A separate venv with DeepSpeed (CPU, no compiled ops) for the optional benchmark row.
bench-venv:
	test -x .venv-bench/bin/python || python3 -m venv .venv-bench
	.venv-bench/bin/pip install -q $(TORCH)
	DS_BUILD_OPS=0 .venv-bench/bin/pip install -q deepspeed -e .

clean:
	rm -rf $(VENV) .venv-bench build *.egg-info
