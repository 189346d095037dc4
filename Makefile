# Each target calls one `iwp` subcommand. The first target run creates .venv and installs everything.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

MODEL   ?= tiny-llava-ov
METHOD  ?= iwp
BUDGET  ?=
GRID    ?=
PROMPT  ?= What is in the image?
IMAGE   ?=
MODEL_PATH ?=
RANDOM_WEIGHTS ?= 0
SELECT  ?= plugin
DTYPE   ?= fp32

ENGINE_ARGS := --model $(MODEL) --method $(METHOD) \
	$(if $(BUDGET),--budget $(BUDGET)) $(if $(GRID),--grid $(GRID)) \
	$(if $(IMAGE),--image "$(IMAGE)") --prompt "$(PROMPT)" \
	$(if $(MODEL_PATH),--model-path "$(MODEL_PATH)") $(if $(filter 1,$(RANDOM_WEIGHTS)),--random-weights) \
	--select $(SELECT) --dtype $(DTYPE)

.PHONY: engine test test-slow compare bench-select clean

# torch==2.13.0 goes in first: here pip takes the local CPU wheel, on a GPU machine its own build.
$(STAMP): pyproject.toml setup.py plugins/visual_token_select/cpu.cpp
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

engine: $(STAMP)
	$(PY) -m iwp engine $(ENGINE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

compare: $(STAMP)
	$(PY) -m iwp compare --model $(MODEL) $(if $(BUDGET),--budget $(BUDGET)) $(if $(GRID),--grid $(GRID))

bench-select: $(STAMP)
	$(PY) -m iwp bench-select

clean:
	rm -rf $(VENV) build *.egg-info
