# Each target calls one `iwp` subcommand. The first target run creates .venv and installs everything.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

# Empty means "not given": the command's own default applies (EngineSpec's for builds), defined once there.
MODEL   ?=
METHOD  ?=
BUDGET  ?=
GRID    ?=
PROMPT  ?=
IMAGE   ?=
MODEL_PATH ?=
RANDOM_WEIGHTS ?= 0
SELECT  ?=
DTYPE   ?=
QUANT   ?=
BACKEND ?=
ENGINE  ?=
BASELINE ?=

ENGINE_ARGS := $(if $(MODEL),--model $(MODEL)) $(if $(METHOD),--method $(METHOD)) \
	$(if $(BUDGET),--budget $(BUDGET)) $(if $(GRID),--grid $(GRID)) \
	$(if $(IMAGE),--image "$(IMAGE)") $(if $(PROMPT),--prompt "$(PROMPT)") \
	$(if $(MODEL_PATH),--model-path "$(MODEL_PATH)") $(if $(filter 1,$(RANDOM_WEIGHTS)),--random-weights) \
	$(if $(SELECT),--select $(SELECT)) $(if $(DTYPE),--dtype $(DTYPE)) $(if $(QUANT),--quant $(QUANT)) \
	$(if $(BACKEND),--backend $(BACKEND))

TENSORRT_ROOT ?=
PLUGIN_BUILD := build/plugins
NVCC    := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)

RUNTIME_BUILD := build/runtime

.PHONY: engine test test-slow test-gpu compare compare-trt profile bench-select bench-cuda plugins kernels-cpu runtime clean \
	train calibrate eval bench

# nlohmann/json (header-only) reads manifests in the runtime core, which the venv's `_core` extension compiles:
# installed first where missing (Debian's and JetPack's nlohmann-json3-dev).
NLOHMANN := /usr/include/nlohmann/json.hpp
SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)

$(NLOHMANN):
	@command -v apt-get >/dev/null 2>&1 || { echo "iwp: nlohmann/json not found ($@): install nlohmann-json3-dev, or its json.hpp into /usr/include/nlohmann" >&2; exit 1; }
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nlohmann-json3-dev

# torch==2.13.0 goes in first: here pip takes the local CPU wheel, on a GPU machine its own build.
$(STAMP): pyproject.toml setup.py $(wildcard plugins/visual_token_select/*.cpp plugins/visual_token_select/*.h) $(wildcard runtime/core/*.cpp runtime/core/*.h) \
		| $(NLOHMANN)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

engine: $(STAMP) $(if $(filter tensorrt auto,$(BACKEND)),plugins)
	$(PY) -m iwp engine $(ENGINE_ARGS)

# The CUDA kernels always compile where nvcc is (sm_87 Orin, sm_89, sm_90); the TensorRT plugin needs
# TensorRT's headers (TENSORRT_ROOT, or JetPack's system paths). Each skip is said in one line.
plugins: $(STAMP)
ifeq ($(NVCC),)
	@echo "iwp: nvcc not found: skipping the CUDA kernels and the TensorRT plugin"
else
	@mkdir -p build
	$(VENV)/bin/cmake -S plugins -B $(PLUGIN_BUILD) -DCMAKE_CUDA_COMPILER=$(NVCC) -DIWP_PYTHON=$(abspath $(PY)) \
		$(if $(TENSORRT_ROOT),-DTENSORRT_ROOT=$(TENSORRT_ROOT)) > $(PLUGIN_BUILD).log
	$(VENV)/bin/cmake --build $(PLUGIN_BUILD) -j2
	@test -f $(PLUGIN_BUILD)/libiwp_trt_plugins.so \
		&& echo "iwp: built $(PLUGIN_BUILD)/libiwp_trt_plugins.so ($$(grep -o 'TensorRT plugin against.*' $(PLUGIN_BUILD).log))" \
		|| echo "iwp: TensorRT not found (set TENSORRT_ROOT): skipped the TensorRT plugin; built the CUDA kernels"
endif

# The CUDA kernels on the CPU, through HIP-CPU (header-only; HIP_CPU_ROOT names a fetched copy outside the
# repo, e.g. git archive of github.com/ROCm/HIP-CPU; needs libtbb-dev): the parity tests run against this
# library without a GPU. Without HIP_CPU_ROOT the target says so in one line and succeeds, so `make test`
# can depend on it; those tests then skip, saying why.
HIP_CPU_ROOT ?=
KERNELS_CPU := build/kernels-cpu/libiwp_vts_kernels_cpu.so
VTS := plugins/visual_token_select

kernels-cpu:
ifeq ($(HIP_CPU_ROOT),)
	@echo "iwp: HIP_CPU_ROOT is not set: skipping the CPU build of the CUDA kernels (set it to a HIP-CPU copy's root)"
else
	@$(MAKE) --no-print-directory $(KERNELS_CPU)

$(KERNELS_CPU): $(wildcard $(VTS)/kernel*.cu $(VTS)/kernel*.cuh $(addprefix $(VTS)/,kernel.h params.h plan.h gpu.h plan.cpp))
	@mkdir -p $(@D)
	g++ -std=c++17 -O2 -ffp-contract=off -fPIC -shared -DIWP_HIP_CPU -isystem $(HIP_CPU_ROOT)/include -I$(VTS) \
		-x c++ $(VTS)/kernel.cu -x c++ $(VTS)/plan.cpp -ltbb -pthread -o $@
endif

# The C++ runtime core (static library, its tests, and the example app where TensorRT is found).
runtime: $(STAMP)
	@mkdir -p build
	$(VENV)/bin/cmake -S runtime -B $(RUNTIME_BUILD) $(if $(TENSORRT_ROOT),-DTENSORRT_ROOT=$(TENSORRT_ROOT)) \
		$(if $(NVCC),-DCMAKE_CUDA_COMPILER=$(NVCC)) > $(RUNTIME_BUILD).log
	$(VENV)/bin/cmake --build $(RUNTIME_BUILD) -j2
	@grep -o 'iwp: .*' $(RUNTIME_BUILD).log || true

test: $(STAMP) plugins kernels-cpu runtime
	$(RUNTIME_BUILD)/test_runtime_core
	$(PY) -m pytest -q -m "not slow and not gpu"

# On a machine with an NVIDIA GPU: the CUDA kernels against the reference, at LLaVA-OV-7B shapes.
test-gpu: $(STAMP) plugins
	$(PY) -m pytest -q -m gpu

bench-cuda: $(STAMP) plugins
	$(PY) -m iwp bench-cuda

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

compare: $(STAMP)
	$(PY) -m iwp compare $(if $(MODEL),--model $(MODEL)) $(if $(BUDGET),--budget $(BUDGET)) $(if $(GRID),--grid $(GRID))

# A TensorRT engine directory against ONNX Runtime on the same inputs (needs TensorRT and the plugin).
compare-trt: $(STAMP)
	$(PY) -m iwp compare-trt "$(ENGINE)"

# Per-stage latency of ENGINE (and the measured/FLOP-ideal speedup against an unpruned BASELINE).
profile: $(STAMP)
	$(PY) -m iwp profile --engine "$(ENGINE)" $(if $(BASELINE),--baseline "$(BASELINE)")

# Accuracy on OVQA: train the bundled ovqa-small (three runs of about 70, 70 and 40 minutes on 2 cores), calibrate its BTP and IWP
# defaults on the calibration split, evaluate every method x budget on the test split. MODEL is passed only
# when given, so eval and calibrate default to ovqa-small.
GIVEN_MODEL = $(if $(MODEL),--model $(MODEL))
EXAMPLES ?=

train: $(STAMP)
	$(PY) -m iwp train --stage base
	$(PY) -m iwp train --stage polish
	$(PY) -m iwp train --stage lookup

calibrate: $(STAMP)
	$(PY) -m iwp calibrate --write-defaults $(GIVEN_MODEL)

eval: $(STAMP)
	$(PY) -m iwp eval $(GIVEN_MODEL) $(if $(GRID),--grid $(GRID)) $(if $(EXAMPLES),--examples $(EXAMPLES)) \
		$(if $(MODEL_PATH),--model-path "$(MODEL_PATH)") $(if $(ENGINE),--engine "$(ENGINE)")

# Method x budget prefill latency on ONNX Runtime against unpruned, llava-ov-0.5b's architecture with
# random weights (about 40 minutes and 20 GB of RAM on 2 cores); BENCHMARKS.md reports it.
bench: $(STAMP)
	$(PY) -m iwp bench --model llava-ov-0.5b --random-weights

bench-select: $(STAMP)
	$(PY) -m iwp bench-select

clean:
	rm -rf $(VENV) build *.egg-info
