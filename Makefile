# pgsync — top-level Makefile. `make demo` and `make test` are the two
# commands a fresh machine needs (they install Debian packages when missing).

CC       ?= gcc
CFLAGS   ?= -O2 -g
WARN      = -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes
BASE      = -std=c11 -D_GNU_SOURCE -fPIC -I. $(WARN)
LIBS      = -lzstd -lxxhash -lcjson -lm
EXT_LIBS  = $(LIBS) -lcurl
SAN       = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

CORE_SRC  = $(wildcard core/*.c)
SQL_SRC   = $(wildcard sqlite_ext/*.c)
HDRS      = database.h $(wildcard core/*.h) $(wildcard sqlite_ext/*.h)

B = build

.PHONY: all deps demo test test-pg bench fuzz format lint clean pg install installcheck server

all: $(B)/sqlitesync.so

deps:
	@bash scripts/deps

$(B)/sqlitesync.so: $(CORE_SRC) $(SQL_SRC) $(HDRS)
	@mkdir -p $(B)
	$(CC) $(BASE) $(CFLAGS) -shared -o $@.tmp$$$$ $(CORE_SRC) $(SQL_SRC) $(EXT_LIBS) && mv -f $@.tmp$$$$ $@

# the same extension under AddressSanitizer + UndefinedBehaviorSanitizer
$(B)/asan/sqlitesync.so: $(CORE_SRC) $(SQL_SRC) $(HDRS)
	@mkdir -p $(B)/asan
	$(CC) $(BASE) -O1 -g $(SAN) -shared -o $@.tmp$$$$ $(CORE_SRC) $(SQL_SRC) $(EXT_LIBS) && mv -f $@.tmp$$$$ $@

# cmocka unit tests of the core, under ASan + UBSan
MOCK_SRC  = $(wildcard test/mockdb*.c)

$(B)/test_%: test/test_%.c $(CORE_SRC) $(HDRS) $(MOCK_SRC) $(wildcard test/*.h)
	@mkdir -p $(B)
	$(CC) $(BASE) -O1 -g $(SAN) -o $@ $< $(MOCK_SRC) $(CORE_SRC) $(LIBS) -lcmocka

# the same unit tests without sanitizers, for valgrind
$(B)/plain/test_%: test/test_%.c $(CORE_SRC) $(HDRS) $(MOCK_SRC) $(wildcard test/*.h)
	@mkdir -p $(B)/plain
	$(CC) $(BASE) -O1 -g -o $@ $< $(MOCK_SRC) $(CORE_SRC) $(LIBS) -lcmocka

UNIT_TESTS = $(patsubst test/%.c,$(B)/%,$(wildcard test/test_*.c))

# libFuzzer target for the payload decoder
$(B)/fuzz_payload: test/fuzz/fuzz_payload.c $(CORE_SRC) $(HDRS) $(MOCK_SRC)
	@mkdir -p $(B)
	clang $(BASE) -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -o $@ $< $(MOCK_SRC) $(CORE_SRC) $(LIBS)

$(B)/bench_sqlite: bench/bench_sqlite.c $(HDRS)
	@mkdir -p $(B)
	$(CC) -std=c11 -D_GNU_SOURCE -O2 -g -I. $(WARN) -o $@ $< -lsqlite3 $(LIBS)

# the main job: Postgres + two pgsync-server processes + two SQLite devices
demo: deps all server
	@bash scripts/demo_full.sh

# the same story without a server: two SQLite files exchanging payloads
demo-local: deps all
	@bash scripts/demo.sh

server:
	$(MAKE) -C server

test: deps
	@bash scripts/run-tests.sh

# the Postgres suite against each major version: 15 on the host, newer ones
# in Debian chroots cached under /var/cache/pgsync-chroots (docs/PG.md)
VERSIONS ?= 15 16 17 18
test-pg: deps all
	@bash scripts/test-pg-matrix.sh $(VERSIONS)

bench: deps all $(B)/bench_sqlite
	@bash scripts/run-bench.sh

FUZZ_SECONDS ?= 60
fuzz: deps $(B)/fuzz_payload
	@mkdir -p $(B)/fuzz-corpus
	$(B)/fuzz_payload -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 $(B)/fuzz-corpus test/fuzz/corpus

FORMAT_SRC = $(CORE_SRC) $(SQL_SRC) $(HDRS) $(wildcard pg_ext/*.c pg_ext/*.h server/*.c server/*.h test/*.c test/*.h test/fuzz/*.c bench/*.c)
format:
	clang-format -i $(FORMAT_SRC)

lint:
	clang-format --dry-run --Werror $(FORMAT_SRC)
	cppcheck --quiet --error-exitcode=1 --enable=warning,portability --inline-suppr \
		-I. -I$(shell pg_config --includedir) $(CORE_SRC) $(SQL_SRC) $(wildcard server/*.c)

# PostgreSQL extension (PGXS leaf in pg_ext/)
pg:
	$(MAKE) -C pg_ext
install: pg
	$(MAKE) -C pg_ext install
installcheck:
	$(MAKE) -C pg_ext installcheck

clean:
	rm -rf $(B)
	-$(MAKE) -C pg_ext clean 2>/dev/null
	-$(MAKE) -C server clean 2>/dev/null
