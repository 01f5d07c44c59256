#!/usr/bin/env bash
# Real, unmodified programs under LD_PRELOAD=libfaultline-preload.so at a
# budget far below what they use: each runs once plainly and once under the
# shim, and their outputs must be byte-identical. Python growing lists,
# bytearrays and BytesIO and reading and writing files; sqlite3 building an
# index on a million rows in memory; GNU sort with a 100 MiB buffer on a
# file larger than the budget; g++ on a large generated source. sort and
# Python run again with user-mode faults only (FAULTLINE_KERNEL_FAULTS=0).
# Usage: real_programs.sh PRELOAD.so   (exit 77 where userfaultfd is denied)
set -euo pipefail
shim=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
budget=${FAULTLINE_TEST_BUDGET:-16M}
under() { env LD_PRELOAD="$shim" FAULTLINE_BUDGET="${program_budget:-$budget}" FAULTLINE_SPILL_DIR="$work" FAULTLINE_SHOW_STATS=1 "$@"; }

# Managed memory must be on, or this proves nothing.
if ! under /bin/true 2>&1 | grep -q "faultline managed memory stats"; then
  if under /bin/true 2>&1 | grep -q "managed memory is off"; then
    echo "skipped: managed memory is off here"; exit 77
  fi
fi

failures=0
# compare NAME CMD...: runs CMD plainly and under the shim; stdout must match.
compare() {
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$work/$name.plain" 2> "$work/$name.plain.err" || { echo "FAIL $name: plain run failed"; cat "$work/$name.plain.err"; failures=$((failures + 1)); return; }
  if ! under "$@" > "$work/$name.shim" 2> "$work/$name.shim.err"; then
    echo "FAIL $name: exit status under the shim"; tail -20 "$work/$name.shim.err"; failures=$((failures + 1)); return
  fi
  if ! cmp -s "$work/$name.plain" "$work/$name.shim"; then
    echo "FAIL $name: output differs under the shim"; diff <(head -c 2000 "$work/$name.plain") <(head -c 2000 "$work/$name.shim") | head -20
    failures=$((failures + 1)); return
  fi
  local managed
  managed=$(grep -m1 -o "allocations [0-9]*" "$work/$name.shim.err" || echo "allocations ?")
  echo "ok   $name ($(wc -c < "$work/$name.plain") bytes of output identical; $managed managed; $((SECONDS - t0)) s)"
}

# Python (Debian's): lists, bytearray, BytesIO, a file written and read back.
cat > "$work/grow.py" <<'EOF'
import hashlib, io, os, sys
h = hashlib.sha256()
xs = []
for i in range(2_000_000):
    xs.append(i * 7 % 1000003)
h.update(str(sum(xs)).encode())
ba = bytearray()
for i in range(40_000):
    ba += bytes([i % 251]) * 1000
h.update(ba)
bio = io.BytesIO()
for i in range(20_000):
    bio.write(b"%08d" % i * 100)
h.update(bio.getvalue())
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(bytes(ba))
with open(path, "rb") as f:
    back = f.read()
h.update(back)
os.unlink(path)
print(len(xs), len(ba), len(bio.getvalue()), len(back), h.hexdigest())
EOF
compare python /usr/bin/python3 "$work/grow.py" "$work/py.bin"

# sqlite3: a million rows and an index, in memory.
if command -v sqlite3 >/dev/null; then
  cat > "$work/index.sql" <<'EOF'
PRAGMA cache_size = -200000;
CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000)
INSERT INTO t SELECT i, (i * 7919) % 1000003, printf('value-%d', i) FROM n;
CREATE INDEX t_k ON t(k);
SELECT count(*), sum(k), min(v), max(v) FROM t;
SELECT id, k FROM t WHERE k BETWEEN 5000 AND 5010 ORDER BY k;
EOF
  # Its one large block (the index sorter, 32 MiB) is read and written at
  # random: at half of it the run takes minutes of spill traffic
  # (docs/ARCHITECTURE.md: random writes past the budget thrash), so it
  # gets a budget a little under it (still ~14,000 chunks spilled and read
  # back, about 6 s).
  program_budget=30M compare sqlite3 sqlite3 :memory: ".read $work/index.sql"
else
  echo "FAIL sqlite3: not installed (scripts/deps.sh installs it)"; failures=$((failures + 1))
fi

# GNU sort with a 100 MiB buffer: it reads the file into one large block.
awk 'BEGIN { for (i = 0; i < 600000; i++) printf "row %d %d\n", (i * 7919) % 1000003, i }' > "$work/rows.txt"
compare sort sort -S 100M "$work/rows.txt"
# As an unprivileged process gets userfaultfd (user-mode faults only): the
# shim's wrappers of read, fread_unlocked and friends touch buffers first.
FAULTLINE_KERNEL_FAULTS=0 compare sort-user-mode sort -S 100M "$work/rows.txt"
FAULTLINE_KERNEL_FAULTS=0 compare python-user-mode /usr/bin/python3 "$work/grow.py" "$work/py.bin"

# g++ on a large generated source: the object file must be the same.
awk 'BEGIN {
  print "#include <map>\n#include <string>\n#include <vector>";
  for (i = 0; i < 1500; i++)
    printf "std::string f%d(const std::vector<int>& v) { std::map<int, std::string> m; for (int x : v) m[x %% %d] += std::to_string(x); return m.empty() ? \"\" : m.begin()->second; }\n", i, i + 3;
}' > "$work/big.cpp"
gxx() { g++ -O1 -c "$work/big.cpp" -o "$work/big.o" && sha256sum < "$work/big.o"; }
export -f gxx; export work
compare gxx bash -c gxx

if [[ $failures -ne 0 ]]; then echo "$failures program(s) failed under the shim"; exit 1; fi
echo "all programs matched their plain runs under the shim at budget $budget"
