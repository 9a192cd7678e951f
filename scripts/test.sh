#!/usr/bin/env bash
# Command 2 of the README: run every test netloom has.
#   lint (ruff, ansible-lint) -> unit + module tests (pytest: netns, real Docker) ->
#   molecule scenarios on the lab (real nodes over SSH, real traffic).
# Idempotent: installs what is missing first (scripts/bootstrap.sh), then runs.
# Usage: scripts/test.sh [--no-molecule] [SCENARIO ...]
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

run_molecule=1
scenarios=()
for arg in "$@"; do
  case "$arg" in
    --no-molecule) run_molecule=0 ;;
    *) scenarios+=("$arg") ;;
  esac
done
if [ ${#scenarios[@]} -eq 0 ]; then
  # A scenario is a directory with a molecule.yml (molecule/shared holds verifier helpers).
  for config in molecule/*/molecule.yml; do scenarios+=("$(basename "$(dirname "$config")")"); done
fi

# Seconds each stage took, printed as a table in the summary (CI's limit is 90 minutes).
times=()
timed() {  # timed NAME START: record NAME as having run from START (date +%s) until now
  times+=("$1|$(( $(date +%s) - $2 ))")
}
started=$(date +%s)
t0=$started
bash scripts/bootstrap.sh || { echo "bootstrap failed"; exit 1; }
timed "bootstrap" "$t0"
# shellcheck disable=SC1091
source .venv/bin/activate
mkdir -p .cache

passed=0
failed=0
failures=()
stage() {  # stage NAME COMMAND...: run one stage, count it, keep going
  local name=$1; shift
  echo "=== $name"
  local t0
  t0=$(date +%s)
  if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); failures+=("$name"); fi
  timed "$name" "$t0"
}

stage "ruff" ruff check library module_utils filter_plugins action_plugins plugin_utils tests bench lab molecule
stage "ansible-lint" ansible-lint -q roles playbooks molecule

echo "=== pytest (unit + module tests)"
t0=$(date +%s)
pytest -q -p no:cacheprovider --junitxml=.cache/pytest.xml tests
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then failures+=("pytest"); fi
timed "pytest" "$t0"
# Counts from pytest's JUnit report; every skipped test is listed with its reason, so a skip
# is always seen (with CI=true only stated platform limits may skip: tests/conftest.py).
read -r py_passed py_failed py_skipped < <(python3 - "$root/.cache/pytest.xml" "$root/.cache/skips.txt" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    suite = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print(0, 1, 0); sys.exit()
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
total, fail = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
skips = [f"{case.get('classname')}::{case.get('name')}: {skip.get('message', '')}"
         for case in suite.iter("testcase") for skip in case.findall("skipped")]
with open(sys.argv[2], "w") as out:
    out.writelines(line + "\n" for line in skips)
print(total - fail - len(skips), fail, len(skips))
PY
)
passed=$((passed + py_passed))
failed=$((failed + py_failed))
skipped=$py_skipped

if [ "$run_molecule" = 1 ]; then
  for scenario in "${scenarios[@]}"; do
    stage "molecule $scenario" molecule test -s "$scenario"
  done
fi

echo
echo "stage times:"
timed "total" "$started"
for entry in "${times[@]}"; do
  seconds=${entry##*|}
  printf '  %-28s %5ds  (%dm%02ds)\n' "${entry%|*}" "$seconds" $((seconds / 60)) $((seconds % 60))
done
if [ "$seconds" -gt 5400 ]; then echo "the total exceeds CI's 90-minute limit"; fi
if [ ${#failures[@]} -gt 0 ]; then echo "failed stages: ${failures[*]}"; fi
if [ "$skipped" -gt 0 ]; then echo "skipped tests:"; sed 's/^/  /' .cache/skips.txt; fi
echo "netloom: $passed passed, $failed failed, $skipped skipped"
[ ${#failures[@]} -eq 0 ]
