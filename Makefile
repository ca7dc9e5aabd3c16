# moe_infinity — build and test entry points.
#
#   make            build the CPU engine library (build/libmoe_infinity.so)
#   make cuda       build the CUDA engine library (build/libmoe_infinity_cuda.so)
#   make test       everything CI runs: vet, Go tests with -race, C ABI test, pytest
#   make fuzz       fuzz every parser (FUZZTIME each, default 60s)
#   make bench      Go benchmarks
#   make tidy-check fail if go.mod/go.sum are not tidy

GO        ?= go
PYTHON    ?= python3
BUILD     := build
LIB       := $(BUILD)/libmoe_infinity.so
FUZZTIME  ?= 60s
GOFILES   := $(shell find go capi -name '*.go' -not -name '*_test.go') go.mod

.PHONY: all lib test gotest testrace invariants vet ctest pytest fuzz bench tidy-check clean install

all: lib

lib: $(LIB)

$(LIB): $(GOFILES)
	@mkdir -p $(BUILD)
	CGO_ENABLED=1 $(GO) build -trimpath -buildmode=c-shared -o $@ ./capi

vet:
	$(GO) vet ./...

gotest:
	$(GO) test -race -cover ./go/...

# The cache's internal consistency checks, compiled in only with this tag.
invariants:
	$(GO) test -race -tags invariants ./go/cache/ ./go/engine/

testrace: gotest invariants

# Compiles a C program against the checked-in header and runs it against
# the built library; also checks the header against the //export list.
ctest: $(LIB)
	$(GO) test ./capi/
	$(CC) -std=c11 -Wall -Wextra -Werror -o $(BUILD)/capi_test tests/c/capi_test.c -Icapi -L$(BUILD) -lmoe_infinity -Wl,-rpath,'$$ORIGIN'
	cd $(BUILD) && ./capi_test && MOE_INFINITY_TEST_HOOKS=1 ./capi_test
	nm -D $(LIB) | grep -c ' T moe_' | xargs test 21 -le

pytest: $(LIB)
	MOE_INFINITY_LIB=$(abspath $(LIB)) $(PYTHON) -m pytest -q tests

test: vet testrace ctest pytest

fuzz:
	$(GO) test ./go/store/ -run '^$$' -fuzz '^FuzzParseHeader$$' -fuzztime $(FUZZTIME)
	$(GO) test ./go/store/ -run '^$$' -fuzz '^FuzzParseIndex$$' -fuzztime $(FUZZTIME)
	$(GO) test ./go/trace/ -run '^$$' -fuzz '^FuzzLoad$$' -fuzztime $(FUZZTIME)
	$(GO) test ./go/trace/ -run '^$$' -fuzz '^FuzzLoadValidCRC$$' -fuzztime $(FUZZTIME)

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./go/...

tidy-check:
	$(GO) mod tidy -diff

install:
	$(PYTHON) -m pip install .

clean:
	rm -rf $(BUILD) python/moe_infinity/*.so python/moe_infinity/*.h
