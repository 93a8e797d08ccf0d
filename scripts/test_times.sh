#!/usr/bin/env bash
# Times the test tiers, idle and with both cores kept busy by two other processes: the figures
# docs/testing.md gives. Usage: scripts/test_times.sh [quick|full ...] (default: quick full).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh
tiers=("$@")
[ ${#tiers[@]} -gt 0 ] || tiers=(quick full)
busy=()
stop_busy() { [ ${#busy[@]} -eq 0 ] || kill "${busy[@]}" 2>/dev/null || true; busy=(); }
trap stop_busy EXIT
echo "| tier | machine | wall | result |"
echo "| --- | --- | --- | --- |"
for load in idle busy; do
  if [ "$load" = busy ]; then
    for _ in 1 2; do python3 -c "while True: pass" & busy+=($!); done
  fi
  for tier in "${tiers[@]}"; do
    args=(-q -p no:cacheprovider)
    [ "$tier" = quick ] && args+=(--quick)
    started=$(date +%s.%N)
    result=$(scripts/test.sh "${args[@]}" 2>&1 | tail -1 || true)
    seconds=$(python3 -c "import sys; print('%.0f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$started" "$(date +%s.%N)")
    echo "| $tier | $load ($(nproc) cores$([ "$load" = busy ] && echo ', two busy loops')) | $((seconds / 60)) min $((seconds % 60)) s | ${result//=/} |"
  done
  stop_busy
done
