# Two commands do everything: `make demo` and `make test`. Each sets up .venv itself.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# nnU-Net starts 8 worker processes by default; this machine class has 2 cores.
export nnUNet_def_n_proc ?= 2
export nnUNet_n_proc_DA ?= 1
export OMP_NUM_THREADS ?= 2
export PYTHONHASHSEED ?= 0
export MPLBACKEND ?= Agg

.PHONY: install browser demo test test-fast check-clean nbtest pytest clean

install: $(STAMP)

# torch and torchvision must be resolved together (nnunetv2 -> timm imports torchvision).
$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	$(BIN)/python -c "import torch, torchvision, monai, nnunetv2, amalgam; print('installed: torch', torch.__version__, 'torchvision', torchvision.__version__, 'monai', monai.__version__)"
	touch $@

demo: install
	$(BIN)/amalgam demo

test: install browser check-clean nbtest pytest

# The inner loop: the notebooks' own tests and every pytest test not marked `slow` (those train models, run nnU-Net,
# render reports or start a browser). CI and `make test` run everything.
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2
	$(BIN)/python -m pytest tests -q -rs -m "not slow" --durations=5

# The widget's browser test drives Debian's Chromium through Playwright (never a downloaded browser).
browser:
	command -v chromium >/dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q && $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q chromium; }

# The notebooks are the source of truth: exporting or cleaning them must change nothing.
check-clean:
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	if [ -n "$$(git status --porcelain -- nbs amalgam)" ]; then \
	  echo "nbdev_clean/nbdev_export changed these files; run them and commit the result:"; \
	  git status --porcelain -- nbs amalgam; git --no-pager diff --stat -- nbs amalgam; exit 1; fi

# Two notebook workers of one thread each: with two threads each they oversubscribe two cores (72 s against 36 s).
nbtest:
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --timing

pytest:
	$(BIN)/python -m pytest tests -q -rs --durations=15

clean:
	rm -rf $(VENV) workspace reports/*/
