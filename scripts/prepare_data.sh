#!/usr/bin/env bash
# Put Fashion-MNIST in .data/fashion-mnist (git-ignored), from Debian's dataset-fashion-mnist
# (installed when missing), so that it can travel with the working tree to a machine that has
# no copy and no internet: the GPU machine, as the device tool's `carry: [".data"]`.
# scripts/gpu_check.sh finds it there and points lfr_ext at it (LFR_EXT_FASHION_MNIST_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=/usr/share/datasets/fashion-mnist
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
if [ ! -e "$SOURCE/t10k-labels-idx1-ubyte.gz" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
mkdir -p .data/fashion-mnist
for name in $FILES; do
  cp "$SOURCE/$name" .data/fashion-mnist/
done
# The copies must be the package's files, whole (a truncated copy would fail only when read).
for name in $FILES; do
  cmp -s "$SOURCE/$name" ".data/fashion-mnist/$name" || { echo "prepare_data: $name differs from $SOURCE" >&2; exit 1; }
  gzip -t ".data/fashion-mnist/$name"
done
echo "prepare_data: .data/fashion-mnist holds Fashion-MNIST ($(du -sh .data/fashion-mnist | cut -f1)); send it along with carry: [\".data\"]"
