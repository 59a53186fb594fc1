# Sourced by the build scripts: set CUDA_HOME to the toolkit that the nvcc on PATH really runs
# (nvcc is often a wrapper script, which makes torch guess a wrong CUDA_HOME), unless CUDA_HOME
# is already set. Returns non-zero, with a message, when there is no nvcc.
lfr_ext_find_cuda_home() {
  if [ -n "${CUDA_HOME:-}" ]; then
    return 0
  fi
  command -v nvcc >/dev/null || { echo "no nvcc on PATH and no CUDA_HOME" >&2; return 1; }
  # nvcc --dryrun prints the directory it really runs from as TOP=<toolkit>/bin/..
  local probe top
  probe=$(mktemp /tmp/lfr_ext_probe.XXXXXX.cu)
  echo '__global__ void k() {}' > "$probe"
  top=$(nvcc --dryrun -c "$probe" -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  rm -f "$probe"
  CUDA_HOME=$(cd "$top" && pwd)
  export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
}
