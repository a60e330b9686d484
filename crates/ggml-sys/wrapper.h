/* The ggml headers the bindings cover: core ops, the CPU backend, backends and buffers, graph allocation, GGUF. */
#include "ggml.h"
#include "ggml-cpu.h"
#include "ggml-backend.h"
#include "ggml-alloc.h"
#include "gguf.h"
