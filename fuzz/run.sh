#!/usr/bin/env bash
# Runs the fuzz targets, one after another, each in one process.
#
#   fuzz/run.sh                      every target, 600 s each (about 1 h 30 min for all nine)
#   fuzz/run.sh routing config       those targets only
#   FUZZ_SECONDS=60 fuzz/run.sh      a shorter run (a smoke test: about 1 minute each)
#   fuzz/run.sh --list               the targets
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a C++ compiler. cargo-fuzz uses
# nightly-only compiler flags (the sanitizer and coverage instrumentation); this script sets
# RUSTC_BOOTSTRAP=1 so that the stable toolchain accepts them. The first build takes several
# minutes. Run it on an otherwise idle machine: it keeps one core busy.
#
# Inputs: each target starts from its committed seeds (fuzz/seeds/<target>/), the inputs that
# once failed (tests/fixtures/fuzz/<target>/) and, for the payload targets, the sample payloads
# in tests/fixtures/. What it learns is kept in fuzz/corpus/<target>/ (not committed), so a
# second run goes on from there.
#
# Findings: a crashing, failing (invariant) or slow input is written to
# fuzz/artifacts/<target>/ (crash-*, timeout-*, oom-*) and the run of that target stops; the
# script goes on with the next one and exits non-zero at the end. Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/crash-...   (in fuzz/)
# After the fix, copy it to tests/fixtures/fuzz/<target>/ under a name that says what it found:
# tests/fuzz_regressions.rs then runs it in `cargo test`.
#
# Each target's libFuzzer output goes to fuzz/logs/<target>.log; the summary printed at the end
# (seconds, executions, coverage, corpus size) comes from its final "DONE" line.
set -uo pipefail
cd "$(dirname "$0")"

TARGETS=(provider_twilio provider_meta provider_dialog360 provider_sinch provider_kaleyra provider_generic
  routing meta_app config)
SECONDS_EACH="${FUZZ_SECONDS:-600}"

if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${TARGETS[@]}"
  exit 0
fi
[ "$#" -eq 0 ] || TARGETS=("$@")

export RUSTC_BOOTSTRAP=1
# The commit in `--version` (build.rs) is of no use to a fuzz target, and reading it from git
# would rebuild the relay after every commit (a build of several minutes).
export WHATSAPP_RELAY_COMMIT="${WHATSAPP_RELAY_COMMIT:-fuzzing}"
command -v cargo-fuzz >/dev/null 2>&1 || { echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 2; }
echo "== cargo fuzz build"
if [ "$#" -eq 0 ]; then
  cargo fuzz build || exit 2
else
  for t in "${TARGETS[@]}"; do cargo fuzz build "$t" || exit 2; done
fi

mkdir -p logs
failed=()
summary=()
for t in "${TARGETS[@]}"; do
  corpus="corpus/$t"
  mkdir -p "$corpus"
  # The sample payloads a provider or app sends, copied in (libFuzzer reads whole folders).
  case "$t" in
    provider_*|meta_app) cp -n ../tests/fixtures/*.json ../tests/fixtures/*.form "$corpus"/ 2>/dev/null ;;
  esac
  seeds=("seeds/$t")
  [ -d "../tests/fixtures/fuzz/$t" ] && seeds+=("../tests/fixtures/fuzz/$t")
  echo "== $t: ${SECONDS_EACH} s, log in fuzz/logs/$t.log"
  # One process (no -jobs/-workers); -timeout: an input that takes 10 s is a finding too.
  if ! cargo fuzz run "$t" "$corpus" "${seeds[@]}" -- \
      -max_total_time="$SECONDS_EACH" -timeout=10 -print_final_stats=1 >"logs/$t.log" 2>&1; then
    failed+=("$t")
    echo "!! $t found something: see fuzz/logs/$t.log and fuzz/artifacts/$t/"
  fi
  done_line=$(grep -a "DONE" "logs/$t.log" | tail -1)
  runs=$(grep -a "^Done [0-9]* runs in" "logs/$t.log" | tail -1)
  summary+=("$t | ${runs:-no Done line} | ${done_line:-no DONE line} | corpus files: $(find "$corpus" -type f | wc -l)")
done

echo "== summary"
printf '%s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "!! findings in: ${failed[*]}"
  exit 1
fi
