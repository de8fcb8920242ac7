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
BACKEND  ?= auto
RECIPE   ?= current
PROMPT   ?= What is 2+2?
THRESHOLD ?= 0.99
RUN_ID   ?=
FAULT    ?= none
MAX_PROMPTS ?= 2
PATHS    ?= prefill,decode
MAX_NEW_TOKENS ?= 48
CAPSULE  ?=
CANDIDATE_TRACE ?=
SWEEP    ?=
RUNS_DIR ?= runs

DEFAULT_MODEL := data/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
STAMP := $(VENV)/.installed

.PHONY: setup test lint model inspect run-all faults judge-trace lab bench clean-venv tiny

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
	touch $@

test: $(SETUP)
	$(RUN) -m ruff check lib tests benchmarks
	$(RUN) -m pytest -q tests

lint: $(SETUP)
	$(RUN) -m ruff check lib tests benchmarks

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

run-all: $(SETUP) $(MODEL_DEP)
	$(RUN) -m fp8parity run-all --model "$(MODEL)" --backend "$(BACKEND)" --recipe "$(RECIPE)" \
		--prompt "$(PROMPT)" --threshold "$(THRESHOLD)" --run-id "$(RUN_ID)" --fault "$(FAULT)" --runs-dir "$(RUNS_DIR)" \
		--max-prompts "$(MAX_PROMPTS)" --paths "$(PATHS)" --max-new-tokens "$(MAX_NEW_TOKENS)" \
		--capsule "$(CAPSULE)" --candidate-trace "$(CANDIDATE_TRACE)"

faults: $(SETUP) $(MODEL_DEP)
	$(RUN) -m fp8parity faults --model "$(MODEL)" --backend "$(BACKEND)" --runs-dir "$(RUNS_DIR)" --sweep "$(SWEEP)"

judge-trace: $(SETUP)
	$(RUN) -m fp8parity judge-trace --model "$(MODEL)" --trace "$(CANDIDATE_TRACE)"

lab: $(SETUP)
	$(RUN) -m jupyter lab notebooks

bench: $(SETUP) $(DEFAULT_MODEL)
	$(RUN) benchmarks/dequant_bench.py --model "$(MODEL)"
	$(RUN) benchmarks/reference_bench.py --model "$(MODEL)"

tiny: $(SETUP)
	$(RUN) -m fp8parity tiny data/cache/tiny-qwen2.gguf

clean-venv:
	rm -rf $(VENV)
