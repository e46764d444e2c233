#!/usr/bin/env bash
# Runs the `omnigen` command and every example offline on the committed tiny checkpoint and checks
# outputs and failures.
set -euo pipefail
cd "$(dirname "$0")/.."
M=tests/fixtures/A/model
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# The binaries of the README's test command (the same features: `cargo run` of one package
# would unify features differently and rebuild much of the tree). A no-op right after it.
cargo test --workspace --release --no-run -q 2>/dev/null || cargo test --workspace --release --no-run
BIN="${CARGO_TARGET_DIR:-target}/release"
run() { local example=$1; shift; [ "${1:-}" = "--" ] && shift; "$BIN/examples/$example" "$@"; }
omnigen() { "$BIN/omnigen" "$@"; }

# text-to-image, editing, two-image subject prompt, every cache / guidance form
omnigen generate --model $M --prompt "a red cat sitting on a blue mat" --height 64 --width 64 \
  --steps 4 --seed 0 --output "$OUT/t2i.png" --save-latents "$OUT/t2i.safetensors"
omnigen generate --model $M --prompt "<img><|image_1|></img> make the cat green and add a hat" \
  --image tests/fixtures/A/edit_in.png --use-input-image-size-as-output --steps 4 --seed 1 \
  --kv-cache exact --output "$OUT/edit.png"
omnigen generate --model $M --prompt "<img><|image_1|></img> and <img><|image_2|></img> sit together" \
  --image tests/fixtures/A/edit_in.png --image tests/fixtures/A/img2_in.png --height 64 --width 48 \
  --steps 3 --seed 2 --joint-cfg --kv-cache off --input-latents mean --output "$OUT/two.png"
# --latents: initial noise read from a safetensors file (here the one --save-latents wrote)
omnigen generate --model $M --prompt "a red cat sitting on a blue mat" --height 64 --width 64 \
  --steps 4 --latents "$OUT/t2i.safetensors" --output "$OUT/from_latents.png"
omnigen generate --model $M --prompt "a red cat sitting on a blue mat" --height 64 --width 64 \
  --steps 2 --seed 0 --lora tests/fixtures/A/lora --lora-scale 0.5 --dtype bf16 --output "$OUT/lora.png"
omnigen generate --model $M --prompt "a red cat" --height 64 --width 64 --steps 2 --seed 0 \
  --no-metadata --output "$OUT/plain.png"
# every scheduler, a time shift, custom sigmas, a CFG range
for s in heun dpmpp-2m unipc euler-shifted; do
  omnigen generate --model $M --prompt "a red cat" --height 64 --width 64 --steps 3 --seed 0 \
    --scheduler $s --time-shift 2 --cfg-range 0,0.6 --output "$OUT/sched_$s.png"
done
omnigen generate --model $M --prompt "a red cat" --height 64 --width 64 --seed 0 \
  --sigmas 1,0.6,0.3 --output "$OUT/sigmas.png"
run embed -- $M "$OUT"
run custom_scheduler -- $M "$OUT/heun.png"
run step_preview -- $M "$OUT" 2
for f in t2i edit two from_latents lora plain embed_cat embed_green heun sched_heun sched_dpmpp-2m \
  sched_unipc sched_euler-shifted sigmas preview_02 preview_04 preview_06 preview_final; do
  test -s "$OUT/$f.png" || { echo "missing $OUT/$f.png"; exit 1; }
done

# batch: docs/batch.md's settings trial (3 guidance scales x 3 seeds), then its re-run skips all
cat > "$OUT/trial.jsonl" <<'EOF_TRIAL'
{"id": "tea", "prompt": "A curly-haired man in a red shirt is drinking tea.", "guidance_scale": [2.0, 2.5, 3.0], "seed": [0, 1, 2]}
EOF_TRIAL
omnigen batch "$OUT/trial.jsonl" --model $M --out "$OUT/trial" --height 64 --width 64 --steps 4 --dry-run
omnigen batch "$OUT/trial.jsonl" --model $M --out "$OUT/trial" --height 64 --width 64 --steps 4
for f in tea/tea_gs2_seed0.png tea/tea_gs3_seed2.png tea/contact_sheet.png report.html results.jsonl; do
  test -s "$OUT/trial/$f" || { echo "missing $OUT/trial/$f"; exit 1; }
done
omnigen batch "$OUT/trial.jsonl" --model $M --out "$OUT/trial" --height 64 --width 64 --steps 4 \
  2>"$OUT/trial.err"
grep -q '^batch: 0 images generated, 9 already done' "$OUT/trial.err" \
  || { echo "the trial's re-run did not skip:"; cat "$OUT/trial.err"; exit 1; }
echo "ok: batch trial and its resume"

# failures: one line, non-zero exit, no output file
expect_fail() {
  local name=$1; shift
  if omnigen generate "$@" --output "$OUT/$name.png" 2>"$OUT/$name.err"; then
    echo "expected failure: $name"; exit 1
  fi
  test ! -e "$OUT/$name.png" || { echo "partial output left by $name"; exit 1; }
  grep -q '^error: ' "$OUT/$name.err" || { echo "no error line for $name"; cat "$OUT/$name.err"; exit 1; }
  ! grep -q 'panicked' "$OUT/$name.err" || { echo "panic in $name"; exit 1; }
  echo "ok (fails cleanly): $name: $(head -n1 "$OUT/$name.err")"
}
expect_fail bad_placeholder --model $M --prompt "x <img><|image_2|></img>" --image tests/fixtures/A/edit_in.png
expect_fail no_model --model "$OUT/nope" --prompt "x"
expect_fail bad_size --model $M --prompt "x" --height 65
expect_fail bad_kv_cache --model $M --prompt "x" --height 64 --width 64 --kv-cache sometimes
expect_fail bad_dtype --model $M --prompt "x" --height 64 --width 64 --dtype f64
expect_fail zero_steps --model $M --prompt "x" --height 64 --width 64 --steps 0
expect_fail nan_scale --model $M --prompt "x" --height 64 --width 64 --guidance-scale NaN
expect_fail bad_scheduler --model $M --prompt "x" --height 64 --width 64 --scheduler ddim
expect_fail bad_cfg_range --model $M --prompt "x" --height 64 --width 64 --cfg-range 0.8,0.2
expect_fail bad_sigmas --model $M --prompt "x" --height 64 --width 64 --sigmas 1,1.5
expect_fail sigmas_unipc --model $M --prompt "x" --height 64 --width 64 --scheduler unipc --sigmas 1,0.5
expect_fail missing_image --model $M --prompt "<img><|image_1|></img>" --image "$OUT/none.png"
echo "not a png" > "$OUT/garbage.png"
expect_fail corrupt_image --model $M --prompt "<img><|image_1|></img>" --image "$OUT/garbage.png"
: > "$OUT/empty.png"
expect_fail empty_image --model $M --prompt "<img><|image_1|></img>" --image "$OUT/empty.png"
expect_fail unused_image --model $M --prompt "no placeholder" --image tests/fixtures/A/edit_in.png
mkdir -p "$OUT/broken/vae" && cp $M/config.json $M/tokenizer.json "$OUT/broken/"
head -c 100000 $M/model.safetensors > "$OUT/broken/model.safetensors"
cp $M/vae/* "$OUT/broken/vae/"
expect_fail truncated_weights --model "$OUT/broken" --prompt "x" --height 64 --width 64
cp $M/model.safetensors "$OUT/broken/" && echo "{" > "$OUT/broken/config.json"
expect_fail bad_config --model "$OUT/broken" --prompt "x" --height 64 --width 64
cp $M/config.json "$OUT/broken/" && rm -r "$OUT/broken/vae"
expect_fail missing_vae --model "$OUT/broken" --prompt "x" --height 64 --width 64
HF_ENDPOINT=http://127.0.0.1:9 HF_HOME="$OUT/hf" expect_fail hub_offline --model Shitao/OmniGen-v1 --prompt "x"
if omnigen generate --model $M --prompt x --height 64 --width 64 --steps 1 --output "$OUT/no/such/dir/x.png" 2>"$OUT/unwritable.err"; then
  echo "expected failure: unwritable output"; exit 1
fi
grep -q '^error: ' "$OUT/unwritable.err" && echo "ok (fails cleanly): unwritable: $(head -n1 "$OUT/unwritable.err")"

# inspect: both committed layouts, and a folder that holds no model
omnigen inspect $M > "$OUT/inspect.txt"
grep -q '^layout        official' "$OUT/inspect.txt" && grep -q 'estimated weight memory' "$OUT/inspect.txt" \
  || { echo "inspect $M:"; cat "$OUT/inspect.txt"; exit 1; }
omnigen inspect tests/fixtures/A/model_diffusers > "$OUT/inspect_diffusers.txt"
grep -q '^layout        diffusers' "$OUT/inspect_diffusers.txt" \
  || { echo "inspect model_diffusers:"; cat "$OUT/inspect_diffusers.txt"; exit 1; }
echo "ok: inspect official and diffusers"
if omnigen inspect tests/fixtures 2>"$OUT/inspect_none.err"; then
  echo "expected failure: inspect tests/fixtures"; exit 1
fi
grep -q '^error: .*missing transformer config' "$OUT/inspect_none.err" \
  || { echo "no error line for inspect_none"; cat "$OUT/inspect_none.err"; exit 1; }
echo "ok (fails cleanly): inspect_none: $(head -n1 "$OUT/inspect_none.err")"
echo "examples ok"
