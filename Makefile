# The FP8 parity workbook. Two commands do everything on a fresh machine:
#   make run-all   # environment if missing, default model, every notebook headless, HTML report
#   make test      # the test suite (CI runs this)
# On a GPU host with the conda environment (environment.yml) active: make run-all RUN=python BACKEND=te

PYTHON   ?= python3
VENV     ?= .venv
TORCH    ?= torch==2.13.0
# The interpreter that runs everything; the venv's unless you pass RUN=python (e.g. a conda env).
RUN      ?= $(VENV)/bin/python
MODEL    ?= data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
RUNS_DIR ?= runs
# Run parameters (BACKEND RECIPE ACCUMULATE PROMPT THRESHOLD PATHS MAX_PROMPTS MAX_NEW_TOKENS FAULT RUN_ID CAPSULE
# CANDIDATE_TRACE ARCHIVE CORPUS CORPUS_TOKENS JOBS LLAMA_DEVICE REFERENCE_DEVICE SWEEP) have their defaults in lib/fp8parity/config.py, defined once: a variable reaches the
# CLI only when you set it (make VAR=value, or the environment), and a bad value, an empty one included, stops the
# run with one line before anything is written.
arg = $(if $(filter command line environment,$(origin $(1))),--$(2) "$($(1))")

DEFAULT_MODEL := data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
STAMP := $(VENV)/.installed

.PHONY: setup test lint notebooks engines llama-wheel llama-trace model inspect run-all faults distribution judge-trace lab bench clean-venv tiny

# Setup only when RUN is the venv's python; with RUN=python the active environment is used as is.
ifeq ($(RUN),$(VENV)/bin/python)
SETUP := $(STAMP)
else
SETUP :=
endif

setup: $(SETUP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
	@if command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory llama-wheel RUN=$(VENV)/bin/python || \
		echo "note: llama.cpp (optional, BACKEND=llama.cpp) did not build; the rest works without it; make engines retries."; \
	else echo "note: no cmake or C++ compiler, so llama.cpp (optional, BACKEND=llama.cpp) is not built; make engines builds it."; fi
	touch $@

test: $(SETUP)
	$(RUN) -m ruff check lib tests benchmarks notebooks
	$(RUN) -m pytest -q tests

lint: $(SETUP)
	$(RUN) -m ruff check lib tests benchmarks notebooks

# after editing a notebooks/NN_*.py in an editor: write its paired .ipynb (JupyterLab through `make lab` keeps both)
notebooks: $(SETUP)
	$(RUN) -m jupytext --sync notebooks/[0-9][0-9]_*.py

$(DEFAULT_MODEL): | $(SETUP)
	$(RUN) -m fp8parity model --dest $@

model: $(SETUP)
	$(RUN) -m fp8parity model --dest $(DEFAULT_MODEL)

inspect: $(SETUP)
	@$(RUN) -m fp8parity inspect "$(MODEL)"

# The default model is fetched only when MODEL is the default.
ifeq ($(MODEL),$(DEFAULT_MODEL))
MODEL_DEP := $(DEFAULT_MODEL)
else
MODEL_DEP :=
endif

# run-all checks every parameter first, then fetches the default model if it is missing, then runs
run-all: $(SETUP)
	@$(RUN) -m fp8parity run-all --model "$(MODEL)" --runs-dir "$(RUNS_DIR)" $(call arg,BACKEND,backend) \
		$(call arg,RECIPE,recipe) $(call arg,ACCUMULATE,accumulate) $(call arg,PROMPT,prompt) \
		$(call arg,THRESHOLD,threshold) $(call arg,RUN_ID,run-id) $(call arg,FAULT,fault) \
		$(call arg,MAX_PROMPTS,max-prompts) $(call arg,PATHS,paths) $(call arg,MAX_NEW_TOKENS,max-new-tokens) \
		$(call arg,CAPSULE,capsule) $(call arg,CANDIDATE_TRACE,candidate-trace) $(call arg,ARCHIVE,archive) \
		$(call arg,CORPUS,corpus) $(call arg,CORPUS_TOKENS,corpus-tokens) $(call arg,JOBS,jobs) \
		$(call arg,LLAMA_DEVICE,llama-device) $(call arg,REFERENCE_DEVICE,reference-device)

faults: $(SETUP) $(MODEL_DEP)
	@$(RUN) -m fp8parity faults --model "$(MODEL)" --runs-dir "$(RUNS_DIR)" $(call arg,BACKEND,backend) \
		$(call arg,SWEEP,sweep)

# notebook 09 for several candidates in one go (CANDIDATES=backend[:recipe],...; default: what this machine runs)
distribution: $(SETUP) $(MODEL_DEP)
	@$(RUN) -m fp8parity distribution --model "$(MODEL)" --runs-dir "$(RUNS_DIR)" $(call arg,CANDIDATES,candidates) \
		$(call arg,CORPUS,corpus) $(call arg,CORPUS_TOKENS,corpus-tokens)

# llama.cpp as a candidate (optional): llama-cpp-python built from source once, the wheel kept in data/cache so a fresh
# venv installs it without building again. CUDA=1: a CUDA build for Hopper (sm_90; CUDA_ARCH=... for another card),
# flash-attention kernels left out (the engine runs attention unfused), kept apart from the CPU wheel.
LLAMA_CPP := llama-cpp-python==0.3.36
CUDA_ARCH ?= 90
WHEELS := data/cache/$(if $(CUDA),wheels-cuda,wheels)
engines: $(SETUP) llama-wheel

# (no prerequisites: also called from the venv's setup, before the venv counts as made)
llama-wheel:
	@ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || { echo "building $(LLAMA_CPP) from source (once; ~6 min on 2 cores) ..."; \
		$(if $(CUDA),CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH) -DGGML_CUDA_FA=off") \
		$(RUN) -m pip wheel -q --no-deps --no-binary llama-cpp-python -w $(WHEELS) "$(LLAMA_CPP)"; }
	$(RUN) -m pip install -q --disable-pip-version-check --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-*.whl
	$(RUN) -m pip install -q --disable-pip-version-check $(WHEELS)/llama_cpp_python-*.whl  # its dependencies (diskcache)

llama-trace: $(SETUP) $(MODEL_DEP)
	@$(RUN) -m fp8parity llama-trace --model "$(MODEL)" --out "$(OUT)" $(if $(PROMPT),--prompt "$(PROMPT)") \
		$(if $(LLAMA_PATH),--path $(LLAMA_PATH)) $(if $(LLAMA_DEVICE),--device $(LLAMA_DEVICE))

judge-trace: $(SETUP)
	@$(RUN) -m fp8parity judge-trace --model "$(MODEL)" --trace "$(CANDIDATE_TRACE)"

# JupyterLab saves through jupytext's contents manager: an edit in a notebook lands in its .py source too
# (as root, in a container, JupyterLab needs --allow-root; LAB_ARGS passes anything else, e.g. --no-browser --port 8899)
lab: $(SETUP)
	$(RUN) -m jupyter lab --ServerApp.contents_manager_class=jupytext.TextFileContentsManager \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) notebooks

bench: $(SETUP) $(DEFAULT_MODEL)
	$(RUN) benchmarks/dequant_bench.py --model "$(MODEL)"
	$(RUN) benchmarks/reference_bench.py --model "$(MODEL)"

tiny: $(SETUP)
	$(RUN) -m fp8parity tiny data/cache/tiny-qwen2.gguf

clean-venv:
	rm -rf $(VENV)
