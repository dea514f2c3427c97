#!/usr/bin/env bash
# Retrain the demo model (ip2p_jax/demo_model/) from nothing, with this project's code only:
#   shapes prompts -> shapes pairs -> TFDS -> KL autoencoder (+ decoder fine-tune) -> latents -> UNet + text encoder
#   -> diffusers folder (fp16) -> evaluation on 500 held-out edits (seed 1000, not used in training).
#
#   scripts/train_demo_model.sh                    # everything, into out/demo/ and ip2p_jax/demo_model/
#   EDITOR_STEPS=40000 DECAY_STEPS=6000 scripts/train_demo_model.sh   # longer
#
# Every stage resumes: run the same command again after an interruption (the training stages are
# presets of `ip2p train`'s loop: orbax checkpoints in $RUN/vae, $RUN/vae_decoder, $RUN/editor). Settings (environment):
#   WORK (out/demo), OUT (ip2p_jax/demo_model), PY (.venv/bin/python), NUM_PROMPTS (40000),
#   VAE_STEPS (800), DECODER_STEPS (5000: decoder fine-tune, encoder frozen), EDITOR_STEPS (9600),
#   DECAY_STEPS (1600: the editor's rate, constant after warm-up, falls linearly to 0 over the last
#   DECAY_STEPS steps), BATCH (64), WORKERS (2), EVAL_NUM (500).
# Runs on CPU (hours) or, with a CUDA jax, on a GPU (minutes); see ip2p_jax/datagen/demo_model.py.
# The shipped model was trained with an earlier UNet and later grown to this one (README: The demo model).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-out/demo}
OUT=${OUT:-ip2p_jax/demo_model}
PY=${PY:-.venv/bin/python}
NUM_PROMPTS=${NUM_PROMPTS:-40000}
VAE_STEPS=${VAE_STEPS:-800}
DECODER_STEPS=${DECODER_STEPS:-5000}
EDITOR_STEPS=${EDITOR_STEPS:-9600}
DECAY_STEPS=${DECAY_STEPS:-1600}
BATCH=${BATCH:-64}
WORKERS=${WORKERS:-2}
EVAL_NUM=${EVAL_NUM:-500}
DATA=$WORK/data
RUN=$WORK/run
start=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - start )) s so far)"; }

stage "1/8 prompts"
[ -f "$DATA/prompts.jsonl" ] || $PY scripts/shapes_prompts.py --num "$NUM_PROMPTS" --seed 0 --out "$DATA/prompts.jsonl"
stage "2/8 pairs (64x64)"
$PY scripts/shapes_pairs.py --prompts "$DATA/prompts.jsonl" --out "$DATA/pairs" --resolution 64 --workers "$WORKERS" --no-progress
stage "3/8 TFDS"
[ -f "$DATA/tfds/edit_pairs/shapes/1.0.0/dataset_info.json" ] || \
  $PY scripts/build_tfds.py --format authors --source "$DATA/pairs" --data-dir "$DATA/tfds" --name shapes --no-progress
stage "4/8 tokenizer + KL autoencoder"
[ -f "$RUN/vae_params.msgpack" ] || $PY -m ip2p_jax.datagen.demo_model vae --workdir "$RUN" --steps "$VAE_STEPS"
stage "5/8 decoder fine-tune (encoder frozen: sharper small shapes, same latents)"
$PY -m ip2p_jax.datagen.demo_model decoder --workdir "$RUN" --steps "$DECODER_STEPS"
stage "6/8 encode pairs (a latent cache: VAE moments + token ids)"
[ -f "$RUN/latents/cache_info.json" ] || $PY -m ip2p_jax.datagen.demo_model encode --workdir "$RUN" --data-dir "$DATA/tfds" --name shapes
stage "7/8 UNet + text encoder (InstructPix2Pix, EMA, conditioning dropout)"
$PY -m ip2p_jax.datagen.demo_model editor --workdir "$RUN" --steps "$EDITOR_STEPS" --batch-size "$BATCH" \
  --decay-start $(( EDITOR_STEPS - DECAY_STEPS )) --decay-steps "$DECAY_STEPS"
stage "8/8 assemble + evaluate"
$PY -m ip2p_jax.datagen.demo_model assemble --workdir "$RUN" --out "$OUT"
$PY scripts/evaluate_shapes.py --model "$OUT" --num "$EVAL_NUM" --seed 1000 --steps 20 \
  --exclude "$DATA/prompts.jsonl" --no-progress | tee "$WORK/evaluation.txt"
stage "done"
