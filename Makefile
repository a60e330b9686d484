# ccsm entry points. `make run` and `make test` do all the set-up on a fresh machine.
CARGO ?= cargo
RELEASE := --release --locked
BIN := target/release/ccsm-infer

.PHONY: setup deps ggml-source build test run bench models clean

## setup: system packages (libclang for bindgen) and the pinned ggml source
setup: deps ggml-source

deps:
	@if ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 && ! ldconfig -p | grep -q 'libclang\.so '; then \
		echo "installing libclang-dev (bindgen needs libclang)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null; \
	fi

ggml-source:
	@./tools/ggml-source.sh >/dev/null

## build: the engine and its CLI, optimized
build: setup
	$(CARGO) build $(RELEASE)

## test: the whole suite
test: setup
	$(CARGO) test $(RELEASE) --workspace

## run: the main job on the embedded default
run: build
	$(BIN) system

## bench: standard benchmark set
bench: build
	$(BIN) system

clean:
	$(CARGO) clean
	rm -rf vendor
