#!/usr/bin/env bash
# Fuzzes every fuzz target of the module, one after the other, and fails
# unless each one ran, found nothing and did not hang.
#
#   bash scripts/fuzz.sh [REGEXP]        (make fuzz / make fuzz-ci)
#
# The targets are discovered (`go test -list '^Fuzz' ./...`), so a new
# one cannot be left out; REGEXP keeps only the targets whose name
# matches it. Settings (environment):
#   FUZZTIME     time (or Nx iterations) per target, default 60s
#   FUZZMINTIME  -fuzzminimizetime, default 100x: minimizing an input is
#                capped at 100 runs, so a short run fuzzes instead of
#                spending its time minimizing at 0 execs/sec (Go's default
#                is 60s per input)
#   FUZZTIMEOUT  -timeout per target, in seconds; default FUZZTIME + 60
#                (600 when FUZZTIME is a count). A target that runs past it
#                has hung, and fails.
#   FUZZLOGS     directory for the full output of each target, default
#                build/fuzz
#
# Prints one line per target: its status, the total execs and the average
# rate over the run (from Go's last "fuzz: elapsed: T, execs: N (R/sec)"
# line), and the size of the corpus. Exits non-zero when a target fails,
# hangs or reports 0 execs. A failing input is written by Go to the
# package's testdata/fuzz/<Target>/ (the log says which file); commit it
# as a regression seed once fixed.
#
# A target that ends with a bare "context deadline exceeded" at the
# -fuzztime boundary and wrote no failing input hit a race in Go's fuzzing
# coordinator (go.dev/issue/75804, fixed in Go 1.27), not a bug of ours:
# it is reported as RACE and does not fail the run. A real finding always
# writes its input.
set -uo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
FUZZTIME=${FUZZTIME:-60s}
FUZZMINTIME=${FUZZMINTIME:-100x}
FUZZLOGS=${FUZZLOGS:-build/fuzz}
filter=${1:-.}

# seconds DURATION: a Go duration of h/m/s parts (or a plain number of
# seconds) in whole seconds, rounded up; empty when it is not one (e.g. a
# count like 500x).
seconds() {
	local d=$1 total=0 n unit
	[[ $d =~ ^[0-9]+$ ]] && { echo "$d"; return; }
	[[ $d =~ ^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$ ]] || return 0
	while [[ $d =~ ^([0-9]+(\.[0-9]+)?)(h|ms|m|s)(.*)$ ]]; do
		n=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]} d=${BASH_REMATCH[4]}
		case $unit in
		h) total=$(awk -v t="$total" -v n="$n" 'BEGIN{print t+n*3600}') ;;
		m) total=$(awk -v t="$total" -v n="$n" 'BEGIN{print t+n*60}') ;;
		s) total=$(awk -v t="$total" -v n="$n" 'BEGIN{print t+n}') ;;
		ms) total=$(awk -v t="$total" -v n="$n" 'BEGIN{print t+n/1000}') ;;
		esac
	done
	awk -v t="$total" 'BEGIN{s=int(t); if (s<t) s++; print s}'
}

if [[ -n ${FUZZTIMEOUT:-} ]]; then
	timeout_s=$FUZZTIMEOUT
elif fs=$(seconds "$FUZZTIME") && [[ -n $fs ]]; then
	timeout_s=$((fs + 60))
else
	timeout_s=600
fi

# Discovery: `go test -list` prints a package's matching names, then its
# "ok <package>" line.
if ! listing=$($GO test -list '^Fuzz' ./... 2>&1); then
	echo "$listing"
	echo "fuzz: listing the fuzz targets failed" >&2
	exit 1
fi
targets=()
pending=()
while IFS= read -r line; do
	case $line in
	Fuzz*) pending+=("$line") ;;
	ok*)
		pkg=$(awk '{print $2}' <<<"$line")
		for name in "${pending[@]}"; do
			[[ $name =~ $filter ]] && targets+=("$pkg $name")
		done
		pending=()
		;;
	esac
done <<<"$listing"
if ((${#targets[@]} == 0)); then
	echo "fuzz: no fuzz targets match '$filter'" >&2
	exit 1
fi

mkdir -p "$FUZZLOGS"
echo "fuzz: ${#targets[@]} targets, -fuzztime $FUZZTIME -fuzzminimizetime $FUZZMINTIME -timeout ${timeout_s}s each; logs in $FUZZLOGS/"
failed=0
summary=()
for t in "${targets[@]}"; do
	pkg=${t% *} name=${t#* }
	short=${pkg#github.com/moe-infinity/moe_infinity/}
	log="$FUZZLOGS/${short//\//.}.$name.log"
	$GO test "$pkg" -run '^$' -fuzz "^$name\$" -fuzztime "$FUZZTIME" \
		-fuzzminimizetime "$FUZZMINTIME" -timeout "${timeout_s}s" >"$log" 2>&1
	rc=$?
	# The last progress line: "fuzz: elapsed: 10s, execs: 12345 (1234/sec), new interesting: 3 (total: 20)".
	last=$(grep -E '^fuzz: elapsed: .*, execs: [0-9]+ ' "$log" | tail -n 1)
	execs=0 elapsed=0 corpus=?
	if [[ $last =~ elapsed:\ ([^,]+),\ execs:\ ([0-9]+) ]]; then
		elapsed=$(seconds "${BASH_REMATCH[1]}") execs=${BASH_REMATCH[2]}
	fi
	[[ $last =~ \(total:\ ([0-9]+)\) ]] && corpus=${BASH_REMATCH[1]}
	rate=$(awk -v n="$execs" -v s="${elapsed:-0}" 'BEGIN{if (s>0) printf "%d", n/s; else print 0}')
	status=PASS
	if ((rc != 0)); then
		status=FAIL
		grep -qE 'panic: test timed out|fuzzing process hung' "$log" && status=HANG
		if [[ $status == FAIL ]] && ((execs > 0)) && grep -qx '    context deadline exceeded' "$log" &&
			! grep -qE 'Failing input written|panic:' "$log"; then
			status=RACE
		fi
	elif ((execs == 0)); then
		status=ZERO
	fi
	line=$(printf '%-5s %-18s %-20s %10s execs in %4ss = %7s/sec  corpus %s' \
		"$status" "$short" "$name" "$execs" "${elapsed:-?}" "$rate" "$corpus")
	echo "$line"
	summary+=("$line")
	if [[ $status == RACE ]]; then
		echo "      ended by Go's fuzztime deadline race (go.dev/issue/75804), no failing input written: not a finding"
	elif [[ $status != PASS ]]; then
		failed=$((failed + 1))
		case $status in
		ZERO) echo "      0 execs: the target never fuzzed (see $log)" ;;
		HANG) echo "      ran past -timeout ${timeout_s}s or a worker hung; log: $log" ;;
		esac
		tail -n 25 "$log" | sed 's/^/      | /'
	fi
done

echo
echo "fuzz summary (FUZZTIME=$FUZZTIME):"
printf '%s\n' "${summary[@]}"
if ((failed > 0)); then
	echo "fuzz: $failed of ${#targets[@]} targets failed" >&2
	exit 1
fi
echo "fuzz: all ${#targets[@]} targets passed"
