#!/usr/bin/env bash
# `make fuzz`: builds the cargo-fuzz targets (fuzz/, nightly, AddressSanitizer, debug assertions),
# replays every checked-in regression input, then fuzzes each target for FUZZ_SECONDS and prints
# executions, execs/s and coverage per target. Any crash, leak, timeout or OOM fails the run and
# leaves its input under fuzz/artifacts/<target>/.
#
#   FUZZ_SECONDS=60        time per target
#   FUZZ_TARGETS="a b"     which targets (default: all)
#   FUZZ_RSS_MB=2048       libFuzzer's memory limit
#   FUZZ_TIMEOUT_S=10      an input running longer is a finding (a hang)
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_RSS_MB=${FUZZ_RSS_MB:-2048}
FUZZ_TIMEOUT_S=${FUZZ_TIMEOUT_S:-10}
ALL="xfcc_certificate xfcc_structured jws_verify jws_signed decide plugin_config header_map azgate_yaml"
FUZZ_TARGETS=${FUZZ_TARGETS:-$ALL}
HOST_TARGETS=" header_map azgate_yaml "
# The machine is shared: fuzz at low priority.
NICE="nice -n 10"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

features=()
for t in $FUZZ_TARGETS; do
  [[ $HOST_TARGETS == *" $t "* ]] && features=(--features host)
done
# One build for every target (cargo-fuzz builds all bins when no target is named).
$NICE cargo +nightly fuzz build --debug-assertions "${features[@]}"
bin_dir=fuzz/target/x86_64-unknown-linux-gnu/release
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}

summary=()
failed=0
for t in $FUZZ_TARGETS; do
  bin=$bin_dir/$t
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  regressed=""
  regressions=(fuzz/regressions/"$t"/*)
  if [ -e "${regressions[0]}" ]; then
    echo "== $t: replaying ${#regressions[@]} regression input(s)"
    if ! $NICE "$bin" -rss_limit_mb="$FUZZ_RSS_MB" -timeout="$FUZZ_TIMEOUT_S" "${regressions[@]}" \
         >"fuzz/artifacts/$t/regressions.log" 2>&1; then
      echo "!! $t: a regression input still fails; see fuzz/artifacts/$t/regressions.log"
      grep -m1 -A3 -E "panicked|ERROR: libFuzzer|ERROR: AddressSanitizer" "fuzz/artifacts/$t/regressions.log" || true
      failed=1
      regressed=" (regression fails)"
    fi
  fi
  dict=()
  [ -f "fuzz/dicts/$t.dict" ] && dict=(-dict="fuzz/dicts/$t.dict")
  echo "== $t: fuzzing for ${FUZZ_SECONDS}s"
  log=fuzz/artifacts/$t/fuzz.log
  status=ok
  if ! $NICE "$bin" -max_total_time="$FUZZ_SECONDS" -rss_limit_mb="$FUZZ_RSS_MB" \
       -timeout="$FUZZ_TIMEOUT_S" -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" \
       "${dict[@]}" "fuzz/corpus/$t" >"$log" 2>&1; then
    status=FOUND
    failed=1
    echo "!! $t: finding; input under fuzz/artifacts/$t/ (minimise with: cargo +nightly fuzz tmin $t <file>)"
    grep -m1 -A30 -E "panicked|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY" "$log" || tail -40 "$log"
  fi
  done_line=$(grep -E "^#[0-9]+.*(DONE|pulse|NEW|REDUCE)" "$log" | tail -1 || true)
  cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$done_line")
  ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$done_line")
  execs=$(sed -nE 's/^stat::number_of_executed_units: *([0-9]+)/\1/p' "$log" | tail -1)
  rate=$(sed -nE 's/^stat::average_exec_per_sec: *([0-9]+)/\1/p' "$log" | tail -1)
  corpus=$(sed -nE 's/.* corp: ([0-9]+)\/.*/\1/p' <<<"$done_line")
  summary+=("$t|$status$regressed|${execs:--}|${rate:--}|${cov:--}|${ft:--}|${corpus:--}")
done

echo
printf '%-18s %12s %9s %7s %8s %7s  %s\n' target execs exec/s cov ft corpus result
for row in "${summary[@]}"; do
  IFS='|' read -r t s e r c f n <<<"$row"
  printf '%-18s %12s %9s %7s %8s %7s  %s\n' "$t" "$e" "$r" "$c" "$f" "$n" "$s"
done
exit "$failed"
