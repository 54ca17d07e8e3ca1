# Entry points. `make demo` and `make test` work on a fresh machine: each builds what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
REPO ?= model_repository
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=
# Requests `make fuzz` sends to the served ensemble (tests/integration/test_fuzz.py; make test sends 300).
FUZZ_REQUESTS ?= 10000
# Where `make serve` keeps the latent cache across restarts (snapshots + journal); empty: no persistence.
CACHE_DIR ?= data/cache
# `make serve REDIS_URL=redis://host:6379/0 [REPLICA_ID=name]`: share the cache with other replicas
# through Redis instead (CACHE_DIR is then unused: Redis's AOF keeps the cache).
REDIS_URL ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

INSTALLED := $(VENV)/.installed
EXPORTED := $(REPO)/.exported

# make perf replays the per-user SD Discord trace when a checkout of the shared workloads sits
# beside this one, else the committed DiffusionDB sample.
PERF_LOG ?= $(firstword $(wildcard ../shared/workloads/sd_discord_dreambot_W1-dream-2.jsonl) perf/data/diffusiondb_sample.jsonl)
# Warm-cache replay: warm-up prefix, measured window per level, levels (closed-loop concurrencies
# and/or `open`), unet_loop batching modes side by side. Concurrency 8 alone: make perf PERF_LEVELS=8
PERF_WARMUP ?= 300
PERF_WINDOW ?= 300
PERF_LEVELS ?= 1,4,8,open
PERF_BATCHING ?= step,execute
PERF_STEPS ?= 50
PERF_SOAK_SECONDS ?= 60
PERF_ARGS ?=

# nirvana-train: stages and extra flags (the defaults reproduce the committed weights; see export/weights/training.json).
TRAIN_STAGES ?= scorer,vae,unet
TRAIN_ARGS ?=
# nirvana-quality: prompt pairs per similarity band, held-out captions for the no-cache adherence,
# tail pairs per kind (10 kinds) for the per-kind false-hit table. make calibrate measures the tail
# with CALIBRATE_PER_KIND pairs per kind (about 1.5 s a pair on 2 cores; resumable: records are
# appended to TAIL_RECORDS as they are measured, a run started again goes on where it stopped).
QUALITY_PER_BAND ?= 30
QUALITY_BASELINE ?= 500
QUALITY_TAIL_PER_KIND ?= 20
CALIBRATE_PER_KIND ?= 200
TAIL_RECORDS ?= perf/results/quality/tail_records.jsonl
QUALITY_ARGS ?=

.PHONY: help venv export serve demo test test-unit fuzz perf soak perf-deps clean train quality calibrate redis-server deploy-check
help:
	@echo "make demo    - install, export the embedded model, serve it, run a few prompts, stop"
	@echo "make test    - install, export, run unit and integration tests (real tritonserver)"
	@echo "make test-unit - the unit tests alone (no tritonserver; the inner loop)"
	@echo "make fuzz    - FUZZ_REQUESTS=$(FUZZ_REQUESTS) random and malformed requests over HTTP and gRPC, then restart checks"
	@echo "make serve   - run tritonserver in the foreground (HTTP_PORT/GRPC_PORT/METRICS_PORT); the cache persists in CACHE_DIR=$(CACHE_DIR)"
	@echo "make export  - export the embedded model into $(REPO)/ (and build/ for the NVIDIA container)"
	@echo "make perf    - benchmarks; results under perf/results/ (PERF_LEVELS=8 for concurrency 8 alone)"
	@echo "make train   - retrain the embedded model's UNet, VAE and scorer into export/weights (CPU; see README)"
	@echo "make quality - quality of approximate hits per K and similarity band; perf/results/quality/"
	@echo "make calibrate - measure the tail (resumable), then write thresholds and guard bounds (export/weights/calibration.json)"
	@echo "make deploy-check - validate deploy/ offline (Kubernetes schemas, kustomize, hadolint, compose spec, cross-checks)"
	@echo "make soak    - the long soak alone (SOAK_SECONDS=600 at concurrency 8); perf/results/soak.md"

venv: $(INSTALLED)
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

export: $(EXPORTED)
$(EXPORTED): $(INSTALLED) $(wildcard export/*.py export/weights/* export/container/*/config.pbtxt $(REPO)/*/config.pbtxt $(REPO)/*/1/model.py)
	$(BIN)/nirvana-export --repository $(REPO)

serve: $(EXPORTED)
	$(BIN)/nirvana-serve --model-repository $(REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
		$(if $(ADMIN_KEY_FILE),--admin-key-file $(ADMIN_KEY_FILE)) \
		$(if $(REDIS_URL),--redis-url $(REDIS_URL) $(if $(REPLICA_ID),--replica-id $(REPLICA_ID)),$(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)))

demo: $(EXPORTED)
	$(BIN)/python -m nirvana_client.demo --model-repository $(REPO) --output demo_output

test: $(EXPORTED) redis-server
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: $(EXPORTED) redis-server
	$(BIN)/python -m pytest --ignore=tests/integration $(PYTEST_ARGS)

# Offline checks of deploy/: Kubernetes schemas (strict), kustomization, hadolint, compose spec, cross-checks.
deploy-check: $(INSTALLED)
	$(BIN)/python deploy/check.py

# Debian's redis-server (7.0): the shared cache tier's store. Tests and benchmarks start their own
# on loopback ports; nothing is started here.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq redis-server)

fuzz: $(EXPORTED)
	NIRVANA_FUZZ_REQUESTS=$(FUZZ_REQUESTS) $(BIN)/python -m pytest -q tests/integration/test_fuzz.py

# perf_analyzer (from tritonclient 2.51) needs Debian's libb64 and libcudart.so.12 (a pip wheel).
perf-deps: $(INSTALLED)
	dpkg -s libb64-0d >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libb64-0d)
	$(BIN)/python -c "import nvidia.cuda_runtime" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[perf]'

perf: $(EXPORTED) perf-deps redis-server
	$(BIN)/python -m nirvana_perf.run_all --log $(PERF_LOG) --warmup $(PERF_WARMUP) --window $(PERF_WINDOW) \
		--levels $(PERF_LEVELS) --batching $(PERF_BATCHING) --steps $(PERF_STEPS) --soak-seconds $(PERF_SOAK_SECONDS) $(PERF_ARGS)

train: $(INSTALLED)
	$(BIN)/nirvana-train --stages $(TRAIN_STAGES) $(TRAIN_ARGS)

quality: $(EXPORTED)
	$(BIN)/nirvana-quality --repository $(REPO) --per-band $(QUALITY_PER_BAND) --baseline $(QUALITY_BASELINE) \
		--tail-per-kind $(QUALITY_TAIL_PER_KIND) --tail-records perf/results/quality/tail_quick.jsonl $(QUALITY_ARGS)

# The tail run (resumable), then the thresholds and the resume guard's bounds from its records,
# written into export/weights/calibration.json (with the records beside it) and pipeline.json.
calibrate: $(EXPORTED)
	$(BIN)/python -m nirvana_quality.tail --repository $(REPO) --records $(TAIL_RECORDS) --per-kind $(CALIBRATE_PER_KIND)
	$(BIN)/nirvana-quality --repository $(REPO) --tail-only --table $(TAIL_RECORDS) --write-thresholds $(QUALITY_ARGS)
	cp $(TAIL_RECORDS) export/weights/tail_records.jsonl

SOAK_SECONDS ?= 600
soak: $(EXPORTED) perf-deps
	$(BIN)/python -m nirvana_perf.run_all --soak-only --soak-seconds $(SOAK_SECONDS) --steps $(PERF_STEPS) --log $(PERF_LOG)

clean:
	rm -rf build demo_output perf/results $(EXPORTED)
	find $(REPO) -path '*/1/*' \( -name '*.onnx' -o -name pipeline.json \) -delete
	rm -rf $(REPO)/tokenizer/1/tokenizer
