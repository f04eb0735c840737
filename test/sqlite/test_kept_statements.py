"""Statements the extension keeps between calls (sl_sql.c, sl_stmt) and what
it reads once per schema (the foreign keys between synced tables): they must
follow the schema and never mix up two tables.

    more distinct statements than the connection keeps (64): every table
        still converges, the least recently used ones are prepared again;
    a column added to a synced table between two syncs: the kept statements
        of that table are prepared again by SQLite, the new column syncs;
    a synced table added later whose rows reference another, with foreign
        keys enforced on the receiver: its rows land with their parents (the
        references are read once per schema, and a new table is new schema).
"""
from synclib import sync_all, table_rows

TABLES = 80


def make_tables(r, n):
    for i in range(n):
        r.xs(f"CREATE TABLE t{i}(id TEXT PRIMARY KEY NOT NULL, v TEXT, n INTEGER)")
        r.init(f"t{i}")


def test_more_tables_than_kept_statements_converge(replica):
    a, b = replica("a"), replica("b")
    for r in (a, b):
        make_tables(r, TABLES)
    for i in range(TABLES):
        a.x(f"INSERT INTO t{i} VALUES (?, ?, ?)", f"k{i}", f"a{i}", i)
        b.x(f"INSERT INTO t{i} VALUES (?, ?, ?)", f"j{i}", f"b{i}", -i)
    sync_all([a, b])
    for round_ in range(3):
        # each round touches every table again: the kept statements of the
        # first tables were pushed out by the last ones in between
        for i in range(TABLES):
            a.x(f"UPDATE t{i} SET n = n + 1, v = ? WHERE id = ?", f"r{round_}", f"k{i}")
            if i % 3 == round_:
                b.x(f"DELETE FROM t{i} WHERE id = ?", f"j{i}")
        sync_all([a, b])
    for i in range(TABLES):
        assert table_rows(a.conn, f"t{i}") == table_rows(b.conn, f"t{i}"), i
        rows = b.q(f"SELECT id, v, n FROM t{i} ORDER BY id")
        assert [r for r in rows if r[0] == f"k{i}"] == [(f"k{i}", "r2", i + 3)]
        assert not [r for r in rows if r[0] == f"j{i}"]  # deleted in one of the rounds


def test_column_added_between_syncs(replica):
    a, b = replica("a"), replica("b")
    for r in (a, b):
        r.xs("CREATE TABLE items(id TEXT PRIMARY KEY NOT NULL, name TEXT)")
        r.init("items")
    a.x("INSERT INTO items VALUES ('x', 'one')")
    sync_all([a, b])
    for r in (a, b):
        r.xs("ALTER TABLE items ADD COLUMN qty INTEGER")
        r.init("items")
    a.x("INSERT INTO items VALUES ('y', 'two', 2)")
    a.x("UPDATE items SET qty = 7 WHERE id = 'x'")
    sync_all([a, b])
    assert b.q("SELECT * FROM items ORDER BY id") == [("x", "one", 7), ("y", "two", 2)]
    assert table_rows(a.conn, "items") == table_rows(b.conn, "items")


def test_table_synced_later_with_foreign_keys_lands(replica):
    a, b = replica("a"), replica("b")
    a.xs("""
        CREATE TABLE p(id TEXT PRIMARY KEY NOT NULL, v TEXT);
        CREATE TABLE c(id TEXT PRIMARY KEY NOT NULL, p TEXT REFERENCES p(id), v TEXT);""")
    # child first on both sides: the payload lists c's rows before p's
    a.init("c")
    a.init("p")
    # b enables its tables child first, with foreign keys enforced
    b.xs("""
        PRAGMA foreign_keys = ON;
        CREATE TABLE p(id TEXT PRIMARY KEY NOT NULL, v TEXT);
        CREATE TABLE c(id TEXT PRIMARY KEY NOT NULL, p TEXT REFERENCES p(id), v TEXT);""")
    b.init("c")
    b.init("p")
    a.x("INSERT INTO p VALUES ('p1', 'parent')")
    a.x("INSERT INTO c VALUES ('c1', 'p1', 'child')")
    sync_all([a, b])
    assert b.q("SELECT * FROM c") == [("c1", "p1", "child")]
    # a third table, synced later on both, references p: its rows need p's
    # rows of the same payload
    for r in (a, b):
        r.xs("CREATE TABLE d(id TEXT PRIMARY KEY NOT NULL, p TEXT REFERENCES p(id), v TEXT)")
        r.init("d")
    a.x("INSERT INTO p VALUES ('p2', 'second')")
    a.x("INSERT INTO d VALUES ('d1', 'p2', 'grandchild')")
    sync_all([a, b])
    assert b.q("SELECT * FROM d") == [("d1", "p2", "grandchild")]
    assert b.q("SELECT * FROM p ORDER BY id") == [("p1", "parent"), ("p2", "second")]
    assert b.one("SELECT count(*) FROM pragma_foreign_key_check") == 0
