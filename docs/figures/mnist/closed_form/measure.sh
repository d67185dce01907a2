#!/bin/bash
# Closed-form stitching matrices against trained ones on the MNIST study's two models, back to back, each the
# whole command (expansion, the receiver alone, the cells, collection, figures): wall and CPU seconds (user + sys
# of the command and its children) appended to STUDY/measure/times.txt, then how well the closed form predicts
# the trained matrix (python -m stitching.matrix.predict) into STUDY/measure/<matrix>-prediction/.
#
# Needs the study's models and matrix configs first: python scripts/toy_study.py --data mnist (STUDY=runs/mnist).
# Usage, from anywhere in the repository:
#   docs/figures/mnist/closed_form/measure.sh [STUDY [MATRIX ...]]
# MATRIX: the matrix files here by name (default all three: bd_vit_tiny_to_resnet18 sl_vit_tiny_to_resnet18
# bd_resnet18_to_vit_tiny). The closed form runs its one group on every core (--parallel 1, the launcher's thread
# count), the trained matrix two cells at a time on one core each (--parallel 2). Run it on an otherwise idle
# machine: the ratio is what it measures.
set -u
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)" || exit 2
HERE=docs/figures/mnist/closed_form
STUDY=$(realpath "${1:-runs/mnist}")
shift $(( $# > 0 ? 1 : 0 ))
D=$STUDY/measure
mkdir -p "$D"
# the study's folder inside the templates' single-quoted YAML strings ('' for '), escaped for sed
FOLDER=$(printf '%s' "$STUDY" | sed -e "s/'/''/g" -e 's/[\\|&]/\\&/g')
for f in "$HERE"/*.yaml; do                 # the matrix files, their base the study's own configs
  sed "s|STUDY|$FOLDER|" "$f" > "$D/$(basename "$f")"
done
T=$D/times.txt
MATRICES=("$@")
[ ${#MATRICES[@]} -eq 0 ] && MATRICES=(bd_vit_tiny_to_resnet18 sl_vit_tiny_to_resnet18 bd_resnet18_to_vit_tiny)
for m in "${MATRICES[@]}"; do
  for mode in closed-form trained; do
    if [ "$mode" = closed-form ]; then args=(--closed-form); else args=(--parallel 2); fi
    echo "  load $(cut -d' ' -f1-3 /proc/loadavg) at $(date +%T)" >> "$T"
    /usr/bin/time -f "$m $mode exit %x wall %e s user %U s sys %S s" -a -o "$T" \
      python -m stitching.matrix "$D/$m.yaml" "${args[@]}" --launcher local --runs-dir "$D/$m-$mode" \
      > "$D/$m-$mode.log" 2>&1
  done
  python -m stitching.matrix.predict "$D/$m-trained/matrix.csv" "$D/$m-closed-form/matrix.csv" \
    --out "$D/$m-prediction" > "$D/$m-prediction.log" 2>&1
done
echo "  load $(cut -d' ' -f1-3 /proc/loadavg) at $(date +%T)" >> "$T"
cat "$T"
