#!/usr/bin/env bash
# `make demo`: the whole job on data the project makes itself. A phantom study and its
# simulated quarter dose, denoised by every bundled model, scored against the full dose.
#   LDCT      the ldct command (default: .venv/bin/ldct)
#   DEMO_OUT  the folder it writes, replaced on each run (default: demo-out)
#   DEMO_SLICES  phantom slices (default: 8)
#   DEMO_SIZE    phantom matrix size (default: 512)
set -euo pipefail
LDCT=${LDCT:-.venv/bin/ldct}
OUT=${DEMO_OUT:-demo-out}
SLICES=${DEMO_SLICES:-8}
SIZE=${DEMO_SIZE:-512}
run() { echo "+ $*" >&2; "$@"; }
[ -t 1 ] || export COLUMNS=${COLUMNS:-150}  # a wide table when the output is a file or a pipe

models=$($LDCT models --json | "${PYTHON:-$(dirname "$(command -v ${LDCT%% *})")/python}" -c '
import json, sys
print(" ".join(m["name"] for m in json.load(sys.stdin) if m["kind"] == "generator" and m["bundled_weights"]))')
if [ -z "$models" ]; then
    echo "demo: no bundled denoising weights (see: $LDCT models)" >&2
    exit 1
fi
if [ -e "$OUT" ] && [ ! -f "$OUT/.ldct-demo" ]; then
    echo "demo: $OUT exists and is not a demo folder; set DEMO_OUT to another path" >&2
    exit 2
fi
rm -rf "$OUT"
mkdir -p "$OUT" && touch "$OUT/.ldct-demo"

pixel=$(awk "BEGIN { print 0.7 * 512 / $SIZE }")  # the same 36 cm field of view at any size
run $LDCT phantom "$OUT/phantom" --slices "$SLICES" --size "$SIZE" --pixel-mm "$pixel" --dose 0.25 --quiet
low=$(echo "$OUT"/phantom/dose25/*)
tests=("$low") labels=(--label "quarter dose")
for m in $models; do
    run $LDCT denoise "$low" "$OUT/denoised/$m" --model "$m" --quiet
    tests+=("$OUT"/denoised/"$m"/*) labels+=(--label "$m")
done
run $LDCT evaluate --reference "$OUT/phantom/full_dose" "${tests[@]}" "${labels[@]}" --out "$OUT/report"
echo
echo "pictures:"
ls "$OUT"/report/*.png
