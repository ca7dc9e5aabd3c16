# moe_infinity — build and test entry points.
#
#   make            build the CPU engine library (build/libmoe_infinity.so)
#   make cuda       build the CUDA engine library (build/libmoe_infinity_cuda.so)
#   make wheel      binary wheel with both engines, installable without Go (dist/)
#   make sdist      source distribution; installing it builds the engine with Go (dist/)
#   make test       everything CI runs: vet, Go tests with -race, C ABI test, pytest
#   make fuzz       fuzz every parser (FUZZTIME each, default 60s; scripts/fuzz.sh)
#   make fuzz-ci    the same with FUZZTIME=10s
#   make bench      Go benchmarks
#   make tidy-check fail if go.mod/go.sum are not tidy

GO        ?= go
PYTHON    ?= python3
BUILD     := build
LIB       := $(BUILD)/libmoe_infinity.so
FUZZTIME  ?= 60s
# Go sources and the C they build with (cgo: go/cpuffn's kernels); a change to either rebuilds.
GOFILES   := $(shell find go capi \( -name '*.go' -not -name '*_test.go' \) -o -name '*.c' -o -name '*.h') go.mod
CUDA_LIB  := $(BUILD)/libmoe_infinity_cuda.so
CUDA_SDK  := $(BUILD)/cuda
CLANG     ?= $(shell command -v clang-16 || command -v clang-17 || command -v clang-18 || command -v clang)
PTX       := go/backend/cuda/moe_ffn.ptx
PTX89     := go/backend/cuda/moe_ffn_sm89.ptx
# The kernels are CUDA C++ compiled to PTX with clang's CUDA front end
# (no CUDA toolkit needed); PTX for sm_80 runs on A100, H100 and later.
# The sm_89 build (Ada and Hopper: engine option kernel_build "sm89")
# decodes FP8 weights with cvt.rn.f16x2.e4m3x2, which on an sm_89 target
# needs PTX ISA 8.1 (ptxas: "requires PTX ISA .version 8.1 or later"; 7.8
# has it for sm_90 only). clang 16 emits 7.8 at most, so PTX89ISA raises
# the header to 8.1: the rest of the file is 7.8 code, which 8.1 keeps.
PTXCOMMON := -x cuda --cuda-device-only -nocudainc -nocudalib -O3 -S
PTXFLAGS  := $(PTXCOMMON) --cuda-gpu-arch=sm_80 -Xclang -target-feature -Xclang +ptx70
PTX89FLAGS := $(PTXCOMMON) --cuda-gpu-arch=sm_89 -Xclang -target-feature -Xclang +ptx78
PTX89ISA  := sed 's/^\.version 7\.8$$/.version 8.1/'

.PHONY: all lib wheel sdist cuda cuda-check cuda-test cpuffn-test ptx ptx-check cuda-sdk gpu-test replay test gotest testrace invariants nocgo vet ctest pytest fuzz fuzz-ci bench tidy-check clean install

all: lib

lib: $(LIB)

$(LIB): $(GOFILES)
	@mkdir -p $(BUILD)
	CGO_ENABLED=1 $(GO) build -trimpath -buildmode=c-shared -o $@ ./capi

# The CUDA build: driver header and link stub fetched by cuda/fetch_sdk.sh.
cuda: $(CUDA_LIB)

cuda-sdk:
	bash cuda/fetch_sdk.sh

$(CUDA_LIB): $(GOFILES) $(PTX) $(PTX89) | cuda-sdk
	CGO_ENABLED=1 CGO_CFLAGS="-I$(abspath $(CUDA_SDK))/include -Wno-deprecated-declarations" CGO_LDFLAGS="-L$(abspath $(CUDA_SDK))/lib" \
		$(GO) build -trimpath -tags cuda -buildmode=c-shared -o $@ ./capi

# Test binaries for the GPU machine, which has no Go: the CUDA backend's
# tests (run them from go/backend/cuda) and the SIMD expert FFN's
# benchmarks (scripts/gpu_check.sh hybrid runs them).
cuda-test: $(CUDA_LIB)
	CGO_ENABLED=1 CGO_CFLAGS="-I$(abspath $(CUDA_SDK))/include -Wno-deprecated-declarations" CGO_LDFLAGS="-L$(abspath $(CUDA_SDK))/lib" \
		$(GO) test -c -tags cuda -o $(BUILD)/cuda_backend.test ./go/backend/cuda

cpuffn-test:
	@mkdir -p $(BUILD)
	CGO_ENABLED=1 $(GO) test -c -o $(BUILD)/cpuffn.test ./go/cpuffn

# Regenerates the FFN kernels' parameter header (cuda/moe_params.h, from
# go/backend/cuda/kparams.go), then the committed PTX (both builds) from
# cuda/*.cu.
ptx:
	$(GO) generate ./go/backend/cuda
	$(CLANG) $(PTXFLAGS) -o $(PTX) cuda/moe_ffn.cu
	$(CLANG) $(PTX89FLAGS) -o - cuda/moe_ffn.cu | $(PTX89ISA) > $(PTX89)

# Fails when cuda/moe_params.h is not what kparams.go generates, when
# either committed PTX differs from what cuda/*.cu compiles to, or declares
# another target or PTX ISA than its build's.
ptx-check:
	$(GO) test -count=1 -run '^TestKernelParamsHeaderIsGenerated$$' ./go/backend/cuda
	@if [ -z "$(CLANG)" ]; then echo "ptx-check: no clang on PATH (apt-get install clang-16); not checked"; exit 0; fi; \
	mkdir -p $(BUILD) && $(CLANG) $(PTXFLAGS) -o $(BUILD)/moe_ffn.check.ptx cuda/moe_ffn.cu && \
	diff -q $(PTX) $(BUILD)/moe_ffn.check.ptx && echo "ptx-check: $(PTX) matches cuda/moe_ffn.cu" && \
	$(CLANG) $(PTX89FLAGS) -o - cuda/moe_ffn.cu | $(PTX89ISA) > $(BUILD)/moe_ffn_sm89.check.ptx && \
	diff -q $(PTX89) $(BUILD)/moe_ffn_sm89.check.ptx && echo "ptx-check: $(PTX89) matches cuda/moe_ffn.cu" && \
	grep -qx '.target sm_80' $(PTX) && grep -qx '.version 7.0' $(PTX) && \
	grep -qx '.target sm_89' $(PTX89) && grep -qx '.version 8.1' $(PTX89) && \
	echo "ptx-check: targets sm_80 (PTX 7.0) and sm_89 (PTX 8.1)"

# Builds the CUDA variant (no GPU needed) and checks its exports.
cuda-check: $(CUDA_LIB) ptx-check
	test $$(nm -D $(CUDA_LIB) | grep -c ' T moe_') -eq $$(grep -c '^int32_t moe_' capi/moe_infinity.h)
	readelf -d $(CUDA_LIB) | grep -q 'NEEDED.*libcuda.so.1'

# On the GPU machine (no Go there): the GPU suite against a carried CUDA build.
gpu-test:
	bash scripts/gpu_check.sh

vet-cuda: cuda-sdk
	CGO_CFLAGS="-I$(abspath $(CUDA_SDK))/include -Wno-deprecated-declarations" CGO_LDFLAGS="-L$(abspath $(CUDA_SDK))/lib" $(GO) vet -tags cuda ./...

vet:
	$(GO) vet ./...

gotest:
	$(GO) test -race -cover ./go/...

# The cache's internal consistency checks, compiled in only with this tag.
invariants:
	$(GO) test -race -tags invariants ./go/cache/ ./go/engine/

# The Go packages as plain Go (no cgo: no SIMD expert FFN, no CPU side of
# hybrid execution): everything else must build, vet and pass without it.
nocgo:
	CGO_ENABLED=0 $(GO) vet ./go/...
	CGO_ENABLED=0 $(GO) test -count=1 ./go/...

testrace: gotest invariants nocgo

# Compiles a C program against the checked-in header and runs it against
# the built library; also checks the header against the //export list.
ctest: $(LIB)
	$(GO) test ./capi/
	$(CC) -std=c11 -Wall -Wextra -Werror -o $(BUILD)/capi_test tests/c/capi_test.c -Icapi -L$(BUILD) -lmoe_infinity -Wl,-rpath,'$$ORIGIN'
	cd $(BUILD) && ./capi_test && MOE_INFINITY_TEST_HOOKS=1 ./capi_test
	test $$(nm -D $(LIB) | grep -c ' T moe_') -eq $$(grep -c '^int32_t moe_' capi/moe_infinity.h)

pytest: $(LIB)
	MOE_INFINITY_LIB=$(abspath $(LIB)) $(PYTHON) -m pytest -q tests

test: vet testrace ctest cuda-check pytest

# Every fuzz target (discovered by the script), FUZZTIME each; fails on a
# finding, a hang (-timeout FUZZTIME+60s) or a target that made 0 execs.
fuzz:
	GO=$(GO) FUZZTIME=$(FUZZTIME) bash scripts/fuzz.sh

# The same, 10s a target, for CI.
fuzz-ci:
	GO=$(GO) FUZZTIME=10s bash scripts/fuzz.sh

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./go/...

# Hit rate of every policy against Belady's optimum on a generated trace.
replay:
	$(GO) run ./go/cmd/moe-replay -layers 32 -experts 8 -topk 2 -requests 40 -tokens 64 -clusters 4 -skew 1.0

tidy-check:
	$(GO) mod tidy -diff

install:
	$(PYTHON) -m pip install .

# Binary wheel: CPU and CUDA engines stripped, manylinux tag from auditwheel.
wheel:
	PYTHON=$(PYTHON) GO=$(GO) bash scripts/build_wheel.sh

sdist:
	$(PYTHON) -m build --sdist --no-isolation --outdir dist .

clean:
	rm -rf $(BUILD) python/moe_infinity/*.so python/moe_infinity/*.h
