#!/usr/bin/env bash
# Run every fuzz target (or those named as arguments) for a bounded time.
#
#   fuzz/run.sh                       # all targets, 60 s each
#   FUZZ_SECONDS=600 fuzz/run.sh routes_loader
#
# Environment:
#   FUZZ_SECONDS    time per target (default 60)
#   FUZZ_TIMEOUT    seconds one input may take before it counts as a hang (default 10)
#   FUZZ_SANITIZER  cargo-fuzz sanitizer: none (default) or address
#   SHARED_DIR      the shared/ checkout with whatsapp/fixtures (default ../shared
#                   beside the repository)
#
# Builds with cargo-fuzz (libFuzzer) on stable Rust through RUSTC_BOOTSTRAP=1,
# into fuzz/target. Corpora live in fuzz/corpus/<target> (kept between runs,
# not tracked), crashes in fuzz/artifacts/<target>. Inputs under
# fuzz/regressions/<target>/ are replayed first.
#
# Exit status: 0 if no target crashed, 1 if any did (the crashing inputs'
# paths are printed), 2 on a setup or build error.
set -uo pipefail

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$FUZZ_DIR")"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-60}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"
SANITIZER="${FUZZ_SANITIZER:-none}"
SHARED="${SHARED_DIR:-$REPO/../shared}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
ALL_TARGETS=(webhook_parse signature routes_loader api_body)
if (($#)); then TARGETS=("$@"); else TARGETS=("${ALL_TARGETS[@]}"); fi

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$FUZZ_DIR/target"

die() { echo "fuzz/run.sh: $*" >&2; exit 2; }

cd "$FUZZ_DIR" || die "cannot cd to $FUZZ_DIR"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz (builds from source, a few minutes)"
    cargo install cargo-fuzz --locked || die "cargo install cargo-fuzz failed"
fi

echo "== building ${TARGETS[*]} (sanitizer: $SANITIZER)"
for t in "${TARGETS[@]}"; do
    [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || die "unknown target $t (known: ${ALL_TARGETS[*]})"
    cargo fuzz build --fuzz-dir "$FUZZ_DIR" --target-dir "$CARGO_TARGET_DIR" \
        -s "$SANITIZER" --release "$t" || die "build of $t failed"
done

# Seed corpora (cp -n: never overwrite what earlier runs found).
seed() { # target, files...
    local t="$1"; shift
    mkdir -p "corpus/$t"
    local f
    for f in "$@"; do
        [[ -f "$f" ]] && cp -n "$f" "corpus/$t/seed-$(basename "$(dirname "$f")")-$(basename "$f")"
    done
}
shopt -s nullglob
fixtures=("$SHARED"/whatsapp/fixtures/webhooks/*.json)
((${#fixtures[@]})) || echo "warning: no webhook fixtures under $SHARED/whatsapp/fixtures/webhooks" >&2
seed webhook_parse "${fixtures[@]}"
seed signature "${fixtures[@]}"
seed routes_loader "$REPO"/routes.toml "$REPO"/examples/*.toml "$REPO"/examples/*/*.toml
seed api_body seeds/api_body/*

declare -A DICT=([webhook_parse]=dicts/json.dict [signature]=dicts/json.dict
                 [routes_loader]=dicts/routes.dict [api_body]=dicts/api.dict)

crashes=()
summary=()
mkdir -p logs
for t in "${TARGETS[@]}"; do
    bin="$CARGO_TARGET_DIR/$TRIPLE/release/$t"
    [[ -x "$bin" ]] || die "no binary at $bin"
    mkdir -p "artifacts/$t"
    log="logs/$t.log"

    regressions=(regressions/"$t"/*)
    if ((${#regressions[@]})); then
        echo "== $t: replaying ${#regressions[@]} regression input(s)"
        for r in "${regressions[@]}"; do
            if ! "$bin" "$r" >"logs/$t.regression.log" 2>&1; then
                echo "CRASH (regression still fails): $FUZZ_DIR/$r"
                grep -m1 -A3 "panicked at" "logs/$t.regression.log" | sed 's/^/    /'
                crashes+=("$FUZZ_DIR/$r")
            fi
        done
    fi

    echo "== $t: fuzzing for ${SECONDS_PER_TARGET}s (log: fuzz/$log)"
    "$bin" "corpus/$t" \
        -max_total_time="$SECONDS_PER_TARGET" -timeout="$TIMEOUT" \
        -dict="${DICT[$t]}" -artifact_prefix="artifacts/$t/" \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    units=$(ls "corpus/$t" | wc -l)
    summary+=("$(printf '%-14s %10s execs  %7s exec/s  %5s corpus  rc=%s' "$t" "${execs:-?}" "${rate:-?}" "$units" "$rc")")
    if ((rc != 0)); then
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        echo "CRASH in $t (libFuzzer exit $rc): ${artifact:+$FUZZ_DIR/$artifact}"
        grep -m1 -A3 -E "panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer" "$log" | sed 's/^/    /'
        echo "    reproduce: $bin ${artifact:+$FUZZ_DIR/$artifact}"
        crashes+=("${artifact:+$FUZZ_DIR/$artifact}")
        [[ -n "$artifact" ]] || crashes[-1]="(no artifact; see fuzz/$log)"
    fi
done

echo "== summary (${SECONDS_PER_TARGET}s per target)"
printf '%s\n' "${summary[@]}"
if ((${#crashes[@]})); then
    echo "== ${#crashes[@]} crashing input(s):"
    printf '  %s\n' "${crashes[@]}"
    exit 1
fi
echo "== no crashes"
