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

# train.ipynb generates the synthetic demo data (data/kaggle_3m) on first use.
demo: install
	mkdir -p runs/$(RUN)
	$(PY) -m papermill --log-output --cwd . train.ipynb runs/$(RUN)/train.ipynb -p run_name $(RUN)
	$(PY) -m papermill --log-output --cwd . inference.ipynb runs/$(RUN)/inference.ipynb -p run_dir runs/$(RUN)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

tensorboard: install
	$(VENV)/bin/tensorboard --logdir runs

# Benchmarks on this machine (about 9 hours on 2 CPU cores; the hippocampus suite needs ../shared/data).
# The 20-minute runs use channels-last and the poly learning-rate schedule (--tuned); see report.md.
SHORT := unet2d unet2d_poly attention_unet2d unet_pp2d_ds unet3d res_unet3d res_unet3d_flip_all vnet \
	unet2d_dice unet2d_dice_focal unet2d_tversky
LIGHT_AFFINE := res_unet3d_shallow_tta_affine30 res_unet3d_shallow_tta_affine30_bf16 \
	res_unet3d_shallow_tta_affine30_bf16_ds res_unet3d_shallow_tta_affine30_bf16_instnorm res_unet3d_fullres8_affine30
P32 := res_unet3d_fullres8_affine30_p32
BEST := $(P32)_intensity25_ensemble2
bench: install
	$(PY) benchmarks/run.py --configs unet2d unet2d_workers2 unet2d_channels_last unet2d_amp_bf16 unet2d_compile --budget 1
	$(PY) benchmarks/run.py --configs $(SHORT) --budget 3 --seeds 0 1
	$(PY) benchmarks/run.py --configs res_unet3d_tta res_unet3d_shallow_tta $(LIGHT_AFFINE) --budget 5 --tuned
	$(PY) benchmarks/run.py --configs unet2d_dice_focal res_unet3d_tta res_unet3d_shallow_wide_tta \
		res_unet3d_shallow_tta_affine30_bf16 res_unet3d_fullres8_affine30 res_unet3d_fullres16_affine30_p32 \
		$(P32)_f24 $(P32)_sample_dice --budget 20 --tuned
	$(PY) benchmarks/run.py --configs res_unet3d_shallow_tta $(P32) $(P32)_intensity25 --budget 20 --tuned --seeds 0 1
	$(PY) benchmarks/run.py --configs $(BEST) --budget 20 --tuned --seeds 0 1 2
	$(PY) benchmarks/figures.py runs/benchmarks/hippocampus-$(BEST)_tuned-20min-seed0
	$(PY) benchmarks/errors.py runs/benchmarks/hippocampus-$(BEST)_tuned-20min-seed0
	$(PY) benchmarks/run.py --suite brain --budget 2
	$(PY) benchmarks/brain_speed.py
	$(PY) benchmarks/model_speed.py
	$(PY) benchmarks/volumetric.py

clean:
	rm -rf runs .cache
