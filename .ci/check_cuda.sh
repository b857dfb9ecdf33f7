#!/usr/bin/env bash
# Compile every csrc/*/*.cu for sm_90a and fail on a compile error or on any register
# spill reported by --resource-usage. Skips (exit 0) when nvcc is not installed.
set -u
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda: nvcc not found, skipping the CUDA compile check"
  exit 0
fi
status=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
shopt -s nullglob
files=(csrc/*/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_cuda: no .cu files found"
  exit 0
fi
for cu in "${files[@]}"; do
  log="$tmp/$(basename "$cu").log"
  if ! nvcc -c -arch=sm_90a --resource-usage -O3 -o "$tmp/$(basename "$cu").o" "$cu" >"$log" 2>&1; then
    echo "check_cuda: FAILED to compile $cu"
    cat "$log"
    status=1
    continue
  fi
  # ptxas prints e.g. "0 bytes spill stores, 0 bytes spill loads"; any non-zero count fails.
  spills=$(grep -oE '[0-9]+ bytes spill (stores|loads)' "$log" | awk '$1 > 0' || true)
  if [ -n "$spills" ]; then
    echo "check_cuda: register spills in $cu:"
    cat "$log"
    status=1
  else
    echo "check_cuda: ok $cu ($(grep -c 'Used [0-9]* registers' "$log") kernels, no spills)"
  fi
  if grep -qi 'warning' "$log"; then
    grep -i 'warning' "$log"
  fi
done
exit $status
