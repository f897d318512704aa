# The two commands: `make demo` and `make test`. Both set up what is missing first (as root:
# Debian packages, kernel-header links, the venv) and are fast when everything is in place.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.veil-installed
SHIM   := $(VENV)/lib/veil/veil-cni

.PHONY: demo test setup system venv lint typecheck unit integration fuzz upstream clean

demo: setup $(if $(KUBE)$(CHART),upstream,)
	$(BIN)/python -m veil.lab.demo -f examples/shop/ $(if $(KEEP),--keep,) $(if $(CAPTURE),--capture $(CAPTURE),) $(if $(KUBE),--kubernetes,) $(if $(CHART),--chart,)

test: setup lint typecheck upstream
	$(BIN)/pytest -q tests/unit tests/fuzz tests/integration tests/interop

setup: system venv $(SHIM)

# veil-cni, the CNI plugin the container runtime runs on the node: static C, no Python needed
# there. Where the agent's installer (and the lab) take it from: <python prefix>/lib/veil/.
$(SHIM): agent/cni/shim/veil-cni.c | $(STAMP)
	@mkdir -p $(dir $@)
	cc -O2 -static -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -o $@ $<

system:
	@bash scripts/setup-system.sh

venv: $(STAMP)

# bcc is not on PyPI (PyPI's `bcc` is an unrelated package): link Debian's python3-bpfcc into
# the venv so `import bcc` works there without exposing the rest of dist-packages.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	ln -sfn /usr/lib/python3/dist-packages/bcc \
	  "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc"
	@touch $@

# The Python folders (src/veil only links them, plus the `veil` command itself).
PYDIRS := core runtime agent waypoint ca controller lab src/veil/__init__.py src/veil/cli.py tests bench

lint: venv
	$(BIN)/ruff check $(PYDIRS)
	$(BIN)/ruff format --check $(PYDIRS)

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

# Every fuzz harness for FUZZ_SECONDS each (make test runs them for a few seconds).
FUZZ_SECONDS ?= 60
fuzz: venv
	for h in $$($(BIN)/python -c 'from tests.fuzz.harnesses import HARNESSES; print(*HARNESSES)' 2>/dev/null); do \
	  echo "== $$h"; $(BIN)/python -m tests.fuzz.harnesses $$h -max_total_time=$(FUZZ_SECONDS) \
	    -print_final_stats=1 2>&1 | grep -E '^(Done|==)|DONE|ERROR' ; done

# The upstream control plane (Kubernetes, etcd, helm) built from Go modules into
# ~/.cache/veil/kubernetes/<version>/bin; nothing when it is already there.
upstream:
	@bash scripts/build-upstream.sh

clean:
	-$(BIN)/veil lab down --all
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
