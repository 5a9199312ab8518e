# Two commands on a fresh machine: `make demo` and `make test` (both install what they need first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN ?= demo

.PHONY: install demo test lint tensorboard bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# train.ipynb generates the synthetic demo data (data/kaggle_3m) on first use; the demo's numbers go to
# benchmarks/results/demo.json (README quotes them).
demo: install
	mkdir -p runs/$(RUN)
	start=$$(date +%s) && \
	$(PY) -m papermill --log-output --cwd . train.ipynb runs/$(RUN)/train.ipynb -p run_name $(RUN) && \
	$(PY) -m papermill --log-output --cwd . inference.ipynb runs/$(RUN)/inference.ipynb -p run_dir runs/$(RUN) && \
	$(PY) benchmarks/demo_summary.py runs/$(RUN) --seconds $$(( $$(date +%s) - start )) \
		--unseen $(if $(filter demo,$(RUN)),,--output runs/$(RUN)/demo.json)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

tensorboard: install
	$(VENV)/bin/tensorboard --logdir runs

# Benchmarks behind report.md (hours on 2 CPU cores; the hippocampus suite and the peers need ../shared).
# The protocol: configurations are chosen by validation DSC, the MONAI peer trains in the same run on the same
# split, and `--protocol` marks the chosen record and writes the headline (report.md, "Protocol").
CANDIDATES := res_unet3d_fullres8_affine30_pfg res_unet3d_fullres8_affine30_pfg_intensity25 \
	res_unet3d_fullres8_affine30_pfg_intensity25_ensemble2
# Rotated patches with zero corners against patches cut from the volume around them, side by side.
CONTEXT_ABLATION := res_unet3d_fullres8_affine30_pfg_intensity25 res_unet3d_fullres8_affine30_pfg_intensity25_context
CONTEXT_RESULTS := benchmarks/results/hippocampus_context.json
# What the seed-0 runs' validation DSC chooses, read when the further seeds start.
CHOSEN = $$($(PY) benchmarks/run.py --chosen --budget 20)
bench: install
	$(PY) benchmarks/run.py --configs $(CANDIDATES) --budget 20 --tuned --seeds 0
	$(PY) benchmarks/peers.py monai --budget 20
	$(PY) benchmarks/run.py --configs $(CHOSEN) --budget 20 --tuned --seeds 1 2
	$(PY) benchmarks/run.py --protocol --budget 20
	$(PY) benchmarks/run.py --configs $(CONTEXT_ABLATION) --budget 20 --tuned --seeds 0 1 --results $(CONTEXT_RESULTS) \
		--runs runs/benchmarks/context
	$(PY) benchmarks/run.py --protocol --budget 20 --results $(CONTEXT_RESULTS)
	$(PY) benchmarks/figures.py runs/benchmarks/hippocampus-$(CHOSEN)_tuned-20min-seed0
	$(PY) benchmarks/demo_selection.py
	$(PY) benchmarks/model_speed.py --demo --repeats 10 --threads 2
	$(PY) benchmarks/demo_errors.py runs/benchmarks/demo-scale30_intensity25_epochs35_poly \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly-seed43 \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly_tversky \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly_context1 \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly_context1-seed43 \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly_budget7 \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly_budget7-seed43 \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly_budget7_patients64 \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly_budget7_patients64-seed43 \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly_budget7_patients64_features8 \
		runs/benchmarks/demo-scale30_intensity25_epochs35_poly_budget7_patients64_features8-seed43
	start=$$(date +%s) && \
	$(PY) -m papermill --cwd . train.ipynb runs/benchmarks/demo-earlier-split.ipynb -p run_name demo-earlier-split \
		-p runs_dir runs/benchmarks -p resume False -f benchmarks/demo_earlier_split.yaml && \
	$(PY) -m papermill --cwd . inference.ipynb runs/benchmarks/demo-earlier-split-inference.ipynb \
		-p run_dir runs/benchmarks/demo-earlier-split && \
	$(PY) benchmarks/demo_summary.py runs/benchmarks/demo-earlier-split --seconds $$(( $$(date +%s) - start )) \
		--unseen --output benchmarks/results/demo_earlier_split.json
	bash benchmarks/cache_speed.sh
	$(PY) benchmarks/reference_comparison.py --epochs 2 --image-size 128
	$(PY) benchmarks/run.py --suite brain --budget 2
	$(PY) benchmarks/preprocessing.py
	$(PY) benchmarks/scale.py --data /tmp/lits-standin
	$(PY) benchmarks/distributed_speed.py
	$(PY) benchmarks/detection.py
	$(PY) benchmarks/detection.py --jitter 0.5 --output benchmarks/results/detection-jitter0.5.json
	$(PY) benchmarks/position_probe.py runs/benchmarks/luna-nodules-50-30min runs/benchmarks/luna-nodules-50-30min-jitter0.5
	$(PY) benchmarks/detection_comparison.py runs/benchmarks/luna-nodules-50-30min runs/benchmarks/luna-nodules-50-30min-jitter0.5
	$(PY) benchmarks/model_speed.py

clean:
	rm -rf runs .cache
