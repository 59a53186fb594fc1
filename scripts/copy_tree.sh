# Sourced by the check scripts: lfr_ext_copy_tree DEST copies the working tree as it is (tracked
# files and untracked ones git does not ignore) to DEST, without build outputs, virtual
# environments or data, so that a check can build there without touching the tree's own build.
lfr_ext_copy_tree() {
  local dest=$1 f
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && { mkdir -p "$dest/$(dirname "$f")"; cp -p "$f" "$dest/$f"; }
  done
}
