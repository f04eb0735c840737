#!/usr/bin/env python3
"""test_examples.py — run every ```sql block of README.md and docs/*.md, so
that the examples cannot drift from the code.

    bash test/docs/run.sh              builds, starts a throwaway Postgres
                                       (test/pg/cluster.sh run) and runs this
    bash test/docs/run.sh PG.md        only the files named

Each file's blocks run in order on one SQLite database (one connection,
build/sqlitesync.so) and one fresh Postgres database (one connection, as the
cluster's superuser), so a block may use what earlier blocks of its file made.
Prints "PASS file:line engine", "FAIL ..." and "SKIP ... (reason)" per block
and engine, then "N passed, N failed, N skipped".

The marker rule (strict). The line right before a ```sql fence may end an
HTML comment, starting at the beginning of a line, that says how the block
runs:

    <!-- example: sqlite -->                 SQLite only
    <!-- example: postgres -->               Postgres only
    <!-- example: sqlite postgres -->        both (the default: an unmarked
                                             block runs on both engines)
    <!-- example: skip (needs a server) -->  not run; the reason is required

and after the engines, separated by ";", options:

    bind :name = EXPR     every :name in the block (and its setup) becomes (EXPR),
                          e.g. bind :payload = sync_payload(0)
    error TEXT            statements may fail, but only with an error containing
                          TEXT, and at least one must

Lines after the first line of the comment, up to "-->", are setup SQL run
(on the same engines) before the block and not shown to readers. The SQLite
database has build/sqlitesync loaded when it is opened, and the Postgres
database has the pgsync extension, unless one of the file's examples for that
engine does it itself (`.load` or `load_extension`; `CREATE EXTENSION pgsync`). A block that
fails, a marker that is not right before a ```sql block, an unknown word in a
marker and a skip without a reason are failures. Dot commands: only `.load`
(SQLite). Errors name the file, the line of the statement and the engine.
Every run starts with a self-check: a small document of good and bad blocks
and markers must come out as expected, so the checker cannot pass everything.
"""
import os
import re
import sqlite3
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXT = os.path.join(ROOT, "build", "sqlitesync")
ENGINES = ("sqlite", "postgres")

passed = failed = skipped = 0


def result(kind, where, what=""):
    global passed, failed, skipped
    if kind == "PASS":
        passed += 1
    elif kind == "FAIL":
        failed += 1
    else:
        skipped += 1
    print(f"{kind} {where}{' ' + what if what else ''}", flush=True)


# ---- extracting blocks ---------------------------------------------------------

class Block:
    def __init__(self, path, line, sql, marker, marker_line):
        self.path, self.line, self.sql = path, line, sql
        self.engines, self.skip, self.binds, self.error, self.setup = ENGINES, None, {}, None, ""
        self.problems = []
        self.marked = marker is not None
        if marker is not None:
            self.parse_marker(marker, marker_line)

    def parse_marker(self, text, line):
        first, _, rest = text.partition("\n")
        self.setup = rest
        parts = [p.strip() for p in first.split(";")]
        head = parts[0]
        m = re.fullmatch(r"skip\s*\((.*)\)", head)
        if m:
            if not m.group(1).strip():
                self.problems.append(f"line {line}: a skip needs a reason: skip (why)")
            self.skip = m.group(1).strip()
        elif head.startswith("skip"):
            self.problems.append(f"line {line}: write the reason in parentheses: skip (why)")
        else:
            words = head.split()
            bad = [w for w in words if w not in ENGINES]
            if bad or not words:
                self.problems.append(f"line {line}: unknown engine {' '.join(bad) or '(none)'}; "
                                     "use sqlite, postgres or skip (reason)")
            self.engines = tuple(e for e in ENGINES if e in words)
        for opt in parts[1:]:
            m = re.fullmatch(r"bind\s+:([A-Za-z_]\w*)\s*=\s*(.+)", opt)
            if m:
                self.binds[m.group(1)] = m.group(2).strip()
                continue
            m = re.fullmatch(r"error\s+(.+)", opt)
            if m:
                self.error = m.group(1).strip()
                continue
            self.problems.append(f"line {line}: unknown option \"{opt}\" (bind :name = EXPR, "
                                 "error TEXT)")

    def where(self):
        return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


LOADS = {"sqlite": re.compile(r"^\s*\.load\s|load_extension\s*\(", re.M),
         "postgres": re.compile(r"CREATE\s+EXTENSION\s+(IF\s+NOT\s+EXISTS\s+)?pgsync", re.I)}
MARKER = re.compile(r"^<!--\s*example:(.*?)-->", re.S | re.M)  # at the start of a line


def extract(path):
    """The ```sql blocks of a file, with their markers; problems of markers
    that precede no sql block come back as blocks with problems only."""
    text = open(path, encoding="utf-8").read()
    lines = text.split("\n")
    blocks, i = [], 0
    pending = None  # (marker text, line, end line index)
    # markers: find each, remember the line where it ends
    markers = {}
    for m in MARKER.finditer(text):
        start = text.count("\n", 0, m.start()) + 1
        end = text.count("\n", 0, m.end()) + 1
        markers[end] = (m.group(1).strip("\n ").rstrip(), start)
    used = set()
    in_fence = None
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", line)
        if fence and in_fence is None:
            in_fence = fence.group(2)
            lang = fence.group(3).lower()
            body, j = [], i + 1
            while j < len(lines) and not lines[j].strip().startswith(in_fence):
                body.append(lines[j])
                j += 1
            in_fence = None
            # the marker must end on the line right before the fence
            marker = markers.get(i)  # 1-based end line == 0-based fence index
            if marker:
                used.add(i)
            if lang == "sql":
                b = Block(path, i + 2, "\n".join(body) + "\n", marker[0] if marker else None,
                          marker[1] if marker else None)
                blocks.append(b)
            elif marker:
                b = Block(path, i + 1, "", None, None)
                b.problems.append(f"line {marker[1]}: an example marker before a ```{lang or ''} "
                                  "block; markers go right before ```sql blocks")
                blocks.append(b)
            i = j + 1
            continue
        i += 1
    for end, (_, start) in markers.items():
        if end not in used:
            b = Block(path, start, "", None, None)
            b.problems.append(f"line {start}: an example marker that is not on the line right "
                              "before a ```sql block")
            blocks.append(b)
    return blocks


# ---- statements ------------------------------------------------------------------

def split_sql(sql, first_line):
    """(line, statement) pairs: ';' outside quotes, dollar quotes and comments.
    Dot commands (a line starting with '.') are statements of their own."""
    out, buf, start = [], [], None
    i, n, line = 0, len(sql), first_line
    at_line_start = True

    def flush():
        nonlocal buf, start
        s = "".join(buf).strip()
        if s and not all(l.strip().startswith("--") or not l.strip() for l in s.split("\n")):
            out.append((start, s))
        buf, start = [], None

    while i < n:
        c = sql[i]
        if at_line_start and not "".join(buf).strip() and c == ".":
            j = sql.find("\n", i)
            j = n if j < 0 else j
            out.append((line, sql[i:j].strip()))
            i = j
            continue
        at_line_start = False
        if start is None and not c.isspace() and not sql.startswith(("--", "/*"), i):
            start = line
        if c == "\n":
            line += 1
            at_line_start = True
            buf.append(c)
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            buf.append(sql[i:j])
            i = j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            j = n if j < 0 else j + 2
            line += sql.count("\n", i, j)
            buf.append(sql[i:j])
            i = j
        elif c in "'\"":
            j = i + 1
            while j < n:
                if sql[j] == c and sql.startswith(c * 2, j):
                    j += 2
                    continue
                if sql[j] == c:
                    break
                j += 1
            line += sql.count("\n", i, j + 1)
            buf.append(sql[i:j + 1])
            i = j + 1
        elif c == "$" and re.match(r"\$(\w*)\$", sql[i:]) and not re.match(r"\$\d", sql[i:]):
            tag = re.match(r"\$(\w*)\$", sql[i:]).group(0)
            j = sql.find(tag, i + len(tag))
            j = n if j < 0 else j + len(tag)
            line += sql.count("\n", i, j)
            buf.append(sql[i:j])
            i = j
        elif c == ";":
            buf.append(c)
            flush()
            i += 1
        else:
            buf.append(c)
            i += 1
    flush()
    return out


def bind(sql, binds):
    for name, expr in binds.items():
        sql = re.sub(r"(?<![:\w]):" + name + r"\b", lambda _m, e=expr: f"({e})", sql)
    return sql


# ---- engines ---------------------------------------------------------------------

class SQLite:
    name = "sqlite"

    def __init__(self, tag, preload):
        self.dir = tempfile.mkdtemp(prefix=f"pgsync-docs-{tag}-")
        self.db = sqlite3.connect(os.path.join(self.dir, "example.db"), isolation_level=None)
        self.db.enable_load_extension(True)
        if preload:
            self.db.load_extension(EXT)

    def run(self, stmt):
        if stmt.startswith("."):
            cmd = stmt.split()
            if cmd[0] != ".load" or len(cmd) != 2:
                raise RuntimeError(f"unsupported dot command {cmd[0]} (only .load PATH)")
            self.db.load_extension(cmd[1])
            return
        # one statement at a time, like the sqlite3 shell; a trigger body may
        # have been split at its inner ';': the caller joins until complete
        self.db.execute(stmt).fetchall()

    def complete(self, stmt):
        return stmt.startswith(".") or sqlite3.complete_statement(stmt)

    def reset(self):
        if self.db.in_transaction:
            self.db.rollback()

    def close(self):
        self.db.close()
        for f in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, f))
        os.rmdir(self.dir)


class Postgres:
    name = "postgres"

    def __init__(self, tag, preload):
        import psycopg2
        self.psycopg2 = psycopg2
        self.dbname = "docs_" + re.sub(r"\W", "_", tag.lower())
        self.admin = psycopg2.connect(dbname="postgres")
        self.admin.autocommit = True
        with self.admin.cursor() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{self.dbname}"')
            c.execute("SELECT rolname FROM pg_roles")
            self.roles = {r[0] for r in c.fetchall()}
        self.db = psycopg2.connect(dbname=self.dbname)
        self.db.autocommit = True
        if preload:
            with self.db.cursor() as c:
                c.execute("CREATE EXTENSION pgsync")

    def run(self, stmt):
        if stmt.startswith(".") or stmt.startswith("\\"):
            raise RuntimeError(f"not SQL for Postgres: {stmt.split()[0]}")
        with self.db.cursor() as c:
            c.execute(stmt)
            if c.description:
                c.fetchall()

    def complete(self, stmt):
        return True

    def reset(self):
        with self.db.cursor() as c:  # a failed block may leave its BEGIN open
            c.execute("ROLLBACK")

    def close(self):
        self.db.close()
        with self.admin.cursor() as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
            c.execute("SELECT rolname FROM pg_roles")
            for (r,) in c.fetchall():
                if r not in self.roles:
                    c.execute(f'DROP ROLE "{r}"')
        self.admin.close()


def message(e):
    return " ".join(str(e).split())


def run_block(eng, b):
    """None when the block ran as its marker says, else why not."""
    seen_error = False
    for part, text, first in (("setup", b.setup, None), ("block", b.sql, b.line)):
        if not text.strip():
            continue
        stmts = split_sql(bind(text, b.binds), first or 0)
        k = 0
        while k < len(stmts):
            line, stmt = stmts[k]
            while not eng.complete(stmt) and k + 1 < len(stmts):
                k += 1
                stmt += "\n" + stmts[k][1]
            k += 1
            where = f"line {line}" if part == "block" else "its setup (in the marker)"
            try:
                eng.run(stmt)
            except Exception as e:
                if b.error and b.error in message(e) and part == "block":
                    seen_error = True
                    continue
                shown = "\n".join(l for l in stmt.split("\n") if not l.strip().startswith("--"))
                short = shown if len(shown) < 160 else shown[:157] + "..."
                return f"{where}: {short!r} failed: {message(e)}"
    if b.error and not seen_error:
        return f"no statement failed with \"{b.error}\" as the marker says"
    return None


SELF_CHECK = """
<!-- example: sqlite -->
```sql
CREATE TABLE t(id TEXT PRIMARY KEY NOT NULL, a TEXT);   -- ; inside a comment
INSERT INTO t VALUES ('x', 'semi;colon');
SELECT sync_init('t');
```

```sql
SELECT no_such_function();
```

<!-- example: sqlite; error no such table -->
```sql
SELECT 1;
```

<!-- example: skip -->
```sql
SELECT 1;
```

<!-- example: sqlite; bind :n = (SELECT count(*) FROM t) -->
Not a block.
"""


def self_check():
    """The checker itself: a passing block passes, a failing one, a missing
    expected error and bad markers are caught. Runs on SQLite only."""
    d = tempfile.mkdtemp(prefix="pgsync-docs-self-")
    path = os.path.join(d, "self.md")
    with open(path, "w") as f:
        f.write(SELF_CHECK)
    try:
        blocks = extract(path)
        eng = SQLite("self", True)
        try:
            got = [(b.line, bool(b.problems), b.skip is None and not b.problems
                    and run_block(eng, b) is None) for b in blocks]
        finally:
            eng.close()
    finally:
        os.unlink(path)
        os.rmdir(d)
    # (line, marker problem, ran as the marker says)
    want = [(4, False, True), (10, False, False), (15, False, False), (20, True, False),
            (23, True, False)]
    if got == want:
        result("PASS", "test_examples self-check")
    else:
        result("FAIL", "test_examples self-check", f"got {got}, want {want}")


# ---- the README's map of the tree -----------------------------------------------

MAPPED = ("core", "sqlite_ext", "pg_ext", "server", "scripts")


def check_file_map():
    """Every source file of the folders in MAPPED (and every docs/*.md) is
    named in the README's "Where things are" section: the map of the tree
    cannot fall behind the tree."""
    text = open(os.path.join(ROOT, "README.md")).read()
    i = text.find("## Where things are")
    section = text[i:text.find("\n## ", i + 1)] if i >= 0 else ""
    if not section:
        result("FAIL", "README.md", "no \"## Where things are\" section")
        return
    missing = []
    for d in MAPPED:
        for f in sorted(os.listdir(os.path.join(ROOT, d))):
            full = os.path.join(ROOT, d, f)
            if not os.path.isfile(full) or f.startswith("."):
                continue
            if d in ("core", "sqlite_ext", "pg_ext", "server") and not f.endswith((".c", ".h", ".mk")):
                continue
            if f"`{f}`" not in section and f"`{d}/{f}`" not in section:
                missing.append(f"{d}/{f}")
    for f in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if f.endswith(".md") and os.path.splitext(f)[0] not in section:
            missing.append(f"docs/{f}")
    if missing:
        result("FAIL", "README.md where things are", "does not name: " + ", ".join(missing))
    else:
        result("PASS", "README.md where things are", "names every file")


def main(args):
    files = [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
        if f.endswith(".md"))
    if args:
        files = [f for f in files if os.path.basename(f) in args]
    have_pg = bool(os.environ.get("PGHOST"))
    self_check()
    if not args or "README.md" in args:
        check_file_map()
    for path in files:
        blocks = extract(path)
        if not blocks:
            continue
        tag = os.path.splitext(os.path.basename(path))[0]
        # a file whose SQLite examples load the extension themselves shows how;
        # otherwise it is loaded when the database is opened
        preload = {e: not any(LOADS[e].search(b.setup + b.sql) for b in blocks
                              if e in b.engines and not b.skip) for e in ENGINES}
        engines = {}
        try:
            for b in blocks:
                if b.problems:
                    for p in b.problems:
                        result("FAIL", f"{b.where()}", f"marker: {p}")
                    continue
                if b.skip:
                    result("SKIP", b.where(), f"({b.skip})")
                    continue
                for name in b.engines:
                    if name not in engines:
                        if name == "postgres" and not have_pg:
                            result("FAIL", b.where(), "postgres: no server (PGHOST is not set); "
                                   "run bash test/docs/run.sh")
                            continue
                        engines[name] = (SQLite if name == "sqlite" else Postgres)(tag, preload[name])
                    why = run_block(engines[name], b)
                    if why is not None:
                        engines[name].reset()
                    if why is None:
                        result("PASS", b.where(), name)
                    else:
                        hint = ""
                        if not b.marked:
                            hint = (" (an unmarked block runs on both engines: mark it "
                                    "<!-- example: sqlite --> or <!-- example: postgres -->, or "
                                    "<!-- example: skip (reason) -->)")
                        result("FAIL", b.where(), f"{name}: {why}{hint}")
        finally:
            for e in engines.values():
                e.close()
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    os.chdir(ROOT)  # `.load ./build/sqlitesync` is relative to the checkout, as in the docs
    sys.exit(main(sys.argv[1:]))
