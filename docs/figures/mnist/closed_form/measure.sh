#!/bin/bash
# closed form vs trained, back to back per direction (nice -n 10; the machine is shared with other jobs):
# wall seconds, and CPU seconds (user + sys of the command and its children), appended to runs/mnist/measure2/times.txt.
# Needs the MNIST study's models and matrix files first: python scripts/toy_study.py --data mnist (runs/mnist).
cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"            # the repository root
D=runs/mnist/measure2
mkdir -p $D
for pair in vit_tiny_to_resnet18 resnet18_to_vit_tiny; do    # the matrix files, based on the study's
  sed "s|^base: .*|base: $PWD/runs/mnist/mnist_matrix_$pair.yaml|" docs/figures/mnist/closed_form/$pair/matrix.yaml \
    > $D/m_$pair.yaml
done
for m in m_vit_tiny_to_resnet18 m_resnet18_to_vit_tiny; do
  echo "  load $(cut -d' ' -f1-3 /proc/loadavg) at $(date +%T)" >> $D/times.txt
  /usr/bin/time -f "$m closed-form exit %x wall %e s user %U s sys %S s" -a -o $D/times.txt \
    nice -n 10 python -m stitching.matrix $D/$m.yaml --closed-form --launcher local --runs-dir $D/$m-closed-form > $D/$m-closed-form.log 2>&1
  echo "  load $(cut -d' ' -f1-3 /proc/loadavg) at $(date +%T)" >> $D/times.txt
  /usr/bin/time -f "$m trained exit %x wall %e s user %U s sys %S s" -a -o $D/times.txt \
    nice -n 10 python -m stitching.matrix $D/$m.yaml --launcher local --runs-dir $D/$m --parallel 2 > $D/$m.log 2>&1
  echo "  load $(cut -d' ' -f1-3 /proc/loadavg) at $(date +%T)" >> $D/times.txt
done
