# vfiouser-iommu: the README's two commands are `make demo` and `make test`.
# Both set up everything from a fresh Debian 12 machine: system packages (with apt,
# as root or through sudo), a virtualenv in .venv, and the guest lab in
# $(VFIOUSER_IOMMU_LAB) (default ~/.cache/vfiouser-iommu).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# swig and the Python headers build pylibfdt; dpkg-deb and tar unpack the lab's packages;
# the riscv64 cross compiler builds the guest tools (tests/bench's iobench).
SYSTEM_PACKAGES := python3-venv python3-dev swig gcc make dpkg tar xz-utils libatomic1 \
                   gcc-riscv64-linux-gnu
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST := $(BIN)/python -m pytest
# The unit tests run every translation test on both the C fast path and pure Python
# (tests/unit/conftest.py); the qtest layer runs a second time with pure Python servers.
QTEST_PURE := VFIOUSER_IOMMU_PURE=1 $(PYTEST) tests/qtest -q

.PHONY: demo test lab deps venv lint unit protocol qtest guest bench fuzz-fastpath profile \
        clean fuzz stress

demo: lab
	$(BIN)/vfiouser-iommu lab boot --server-log

test: lab lint
	$(PYTEST) tests/unit tests/protocol tests/fuzz tests/qtest tests/guest
	$(QTEST_PURE)
	$(PYTEST) tests/bench -m bench -s -q

lab: venv
	$(BIN)/vfiouser-iommu lab provision

deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "== installing system packages:" $$missing; \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml c_ext/fastpath.c c_ext/fastpath.h \
                    c_ext/build_fastpath.py | deps
	@echo "== setting up $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

lint: venv
	$(BIN)/ruff check vfiouser_iommu tests c_ext setup.py

unit: venv
	$(PYTEST) tests/unit
# The fuzzers' short CI pass (tests/fuzz) runs with the protocol layer.
protocol: venv
	$(PYTEST) tests/protocol tests/fuzz
qtest: lab
	$(PYTEST) tests/qtest
	$(QTEST_PURE)
guest: lab
	$(PYTEST) tests/guest
bench: lab
	$(PYTEST) tests/bench -m bench -s
# The C fast path against the Python reference on 2000 random worlds (docs/fastpath.md).
fuzz-fastpath: venv
	FASTPATH_EXAMPLES=2000 $(PYTEST) tests/unit/test_fastpath_equivalence.py -q
# Where the server's time goes per guest I/O request (docs/performance.md); minutes.
profile: lab
	$(BIN)/python tests/bench/profile_guest_io.py

# Coverage-guided fuzzing (tests/fuzz, docs/robustness.md): every target for
# FUZZ_SECONDS each, or FUZZ_RUNS inputs each; FUZZ_TARGETS=a,b picks targets. The
# working corpora and any crash inputs stay in build/fuzz.
FUZZ_SECONDS ?= 60
fuzz: venv
	$(BIN)/python tests/fuzz/run_fuzz.py --workdir build/fuzz \
	    $(if $(FUZZ_RUNS),--runs $(FUZZ_RUNS),--seconds $(FUZZ_SECONDS)) \
	    $(if $(FUZZ_TARGETS),--targets $(FUZZ_TARGETS))

# QEMU killed and replaced STRESS_ROUNDS times under one server, with fd/VMA/RSS
# checks (tests/guest/test_client_death.py; CI runs 3 rounds).
STRESS_ROUNDS ?= 20
stress: lab
	STRESS_ROUNDS=$(STRESS_ROUNDS) $(PYTEST) tests/guest/test_client_death.py -s

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache vfiouser_iommu/_fastpath*.so
