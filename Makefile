# pgsync — top-level Makefile. `make demo` and `make test` are the two
# commands a fresh machine needs (they install Debian packages when missing).

CC       ?= gcc
CFLAGS   ?= -O2 -g
WARN      = -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes
BASE      = -std=c11 -D_GNU_SOURCE -fPIC -I. $(WARN)
LIBS      = -lzstd -lxxhash -lcjson -lm
EXT_LIBS  = $(LIBS) -lcurl
SAN       = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

PGS_CORE_DIR = core
include core/core.mk
CORE_SRC  = $(PGS_CORE_SRC)
SQL_SRC   = $(wildcard sqlite_ext/*.c)
HDRS      = database.h $(wildcard core/*.h) $(wildcard sqlite_ext/*.h)

B = build

.PHONY: all deps demo test test-pg bench fuzz format lint clean pg install installcheck server

all: $(B)/sqlitesync.so

deps:
	@bash scripts/deps

$(B)/sqlitesync.so: $(CORE_SRC) $(SQL_SRC) $(HDRS)
	@mkdir -p $(B)
	$(CC) $(BASE) $(CPPFLAGS) $(CFLAGS) $(LDFLAGS) -shared -o $@.tmp$$$$ $(CORE_SRC) $(SQL_SRC) $(EXT_LIBS) && mv -f $@.tmp$$$$ $@

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

# the server bench's load generator (bench/server_bench.py, pushraw)
$(B)/pushload: bench/pushload.c
	@mkdir -p $(B)
	$(CC) -std=c11 -D_GNU_SOURCE -O2 -g $(WARN) -pthread -o $@ $< -lcurl

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

bench: deps all $(B)/bench_sqlite $(B)/pushload
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
installcheck:
	@echo "installcheck: pg_regress against a running PostgreSQL with pgsync installed (PGHOST, PGPORT, PGUSER select it); for a throwaway cluster: bash test/pg/cluster.sh"
	$(MAKE) -C pg_ext installcheck

# ---- make install / make uninstall ------------------------------------------
# The usual conventions: PREFIX (/usr/local), DESTDIR for staged installs,
# and each directory overridable. The Postgres extension goes where
# $(PG_CONFIG) says (PGXS; DESTDIR honoured). `.load sqlitesync` and
# sqlite3.load_extension('sqlitesync') find sqlitesync.so by name only in the
# dynamic loader's default directories (/usr/lib, /usr/lib/<multiarch>, ...):
# PREFIX=/usr puts it there; elsewhere load it by path or set LD_LIBRARY_PATH.
PREFIX        ?= /usr/local
BINDIR        ?= $(PREFIX)/bin
LIBDIR        ?= $(PREFIX)/lib
SQLITE_EXTDIR ?= $(LIBDIR)
SYSCONFDIR    ?= /etc
DATADIR       ?= $(PREFIX)/share
DOCDIR        ?= $(DATADIR)/doc/pgsync
MANDIR        ?= $(DATADIR)/man
UNITDIR       ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR   ?= $(PREFIX)/lib/sysusers.d
PG_CONFIG     ?= pg_config
INSTALL       ?= install
MULTIARCH     := $(shell $(CC) -print-multiarch 2>/dev/null)
LOADER_DIRS    = /lib /usr/lib $(if $(MULTIARCH),/lib/$(MULTIARCH) /usr/lib/$(MULTIARCH))
DOCS           = README.md LICENSE $(wildcard docs/*.md) docs/grafana-pgsync.json
CONF           = $(SYSCONFDIR)/pgsync/pgsync-server.conf

.PHONY: install-pg install-sqlite install-server install-docs uninstall deb test-packages

install: install-pg install-sqlite install-server install-docs

install-pg:
	$(MAKE) -C pg_ext PG_CONFIG=$(PG_CONFIG)
	$(MAKE) -C pg_ext PG_CONFIG=$(PG_CONFIG) install

install-sqlite: $(B)/sqlitesync.so
	$(INSTALL) -d $(DESTDIR)$(SQLITE_EXTDIR)
	$(INSTALL) -m 644 $(B)/sqlitesync.so $(DESTDIR)$(SQLITE_EXTDIR)/sqlitesync.so
	@$(if $(filter $(SQLITE_EXTDIR),$(LOADER_DIRS)),:,echo "note: $(SQLITE_EXTDIR) is not one of the dynamic loader's default directories, so SQLite finds the extension by path only: .load $(SQLITE_EXTDIR)/sqlitesync (or set LD_LIBRARY_PATH=$(SQLITE_EXTDIR), or install with PREFIX=/usr)")

# the server, its unit (paths filled in for these directories) and system
# user; the example settings become $(CONF) unless that file exists (never
# overwritten)
install-server: server
	@mkdir -p $(B)
	sed -e 's|@BINDIR@|$(BINDIR)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g' -e 's|@DOCDIR@|$(DOCDIR)|g' \
		server/pgsync-server.service.in > $(B)/pgsync-server.service
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
		$(DESTDIR)$(DOCDIR) $(DESTDIR)$(SYSCONFDIR)/pgsync $(DESTDIR)$(MANDIR)/man1
	$(INSTALL) -m 755 server/pgsync-server $(DESTDIR)$(BINDIR)/pgsync-server
	$(INSTALL) -m 644 server/pgsync-server.1 $(DESTDIR)$(MANDIR)/man1/pgsync-server.1
	$(INSTALL) -m 644 $(B)/pgsync-server.service $(DESTDIR)$(UNITDIR)/pgsync-server.service
	$(INSTALL) -m 644 server/pgsync-server.sysusers $(DESTDIR)$(SYSUSERSDIR)/pgsync-server.conf
	$(INSTALL) -m 644 server/pgsync-server.conf.example $(DESTDIR)$(DOCDIR)/pgsync-server.conf.example
	@if [ -e $(DESTDIR)$(CONF) ]; then \
		echo "note: $(DESTDIR)$(CONF) exists, left as it is"; \
	else \
		echo "$(INSTALL) -m 640 server/pgsync-server.conf.example $(DESTDIR)$(CONF)"; \
		$(INSTALL) -m 640 server/pgsync-server.conf.example $(DESTDIR)$(CONF); \
	fi
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then \
		if ! getent passwd pgsync >/dev/null && command -v systemd-sysusers >/dev/null; then \
			echo "systemd-sysusers $(SYSUSERSDIR)/pgsync-server.conf   # creates the system user pgsync"; \
			systemd-sysusers $(SYSUSERSDIR)/pgsync-server.conf; \
		fi; \
		if getent group pgsync >/dev/null; then chgrp pgsync $(CONF) && echo "chgrp pgsync $(CONF)"; fi; \
	fi
	@echo "next: set jwt_secret, database and allowed_roles in $(CONF), check them with"
	@echo "  $(BINDIR)/pgsync-server --config $(CONF) --check-config"
	@echo "then: systemctl daemon-reload && systemctl enable --now pgsync-server"

install-docs:
	$(INSTALL) -d $(DESTDIR)$(DOCDIR)
	$(INSTALL) -m 644 $(DOCS) $(DESTDIR)$(DOCDIR)/

# ---- Debian packages (debian/; docs/SERVER.md, "Packages") -------------------
# built from a copy of the checkout (tracked and new files) into build/deb/
deb:
	@bash scripts/deps packages
	rm -rf $(B)/deb
	mkdir -p $(B)/deb/src
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(B)/deb/src
	cd $(B)/deb/src && pg_buildext updatecontrol && dpkg-buildpackage -us -uc -b
	@ls -1 $(B)/deb/*.deb

# build them, lintian, install them here, smoke-test the installed files, purge
test-packages:
	@bash test/packages/run.sh

# uninstall removes what install put in place; the settings file only if it
# is still the example (edited settings are kept, and said so), never the user
uninstall:
	$(MAKE) -C pg_ext PG_CONFIG=$(PG_CONFIG) uninstall
	rm -f $(DESTDIR)$(SQLITE_EXTDIR)/sqlitesync.so $(DESTDIR)$(BINDIR)/pgsync-server \
		$(DESTDIR)$(MANDIR)/man1/pgsync-server.1 \
		$(DESTDIR)$(UNITDIR)/pgsync-server.service $(DESTDIR)$(SYSUSERSDIR)/pgsync-server.conf \
		$(DESTDIR)$(DOCDIR)/pgsync-server.conf.example $(addprefix $(DESTDIR)$(DOCDIR)/,$(notdir $(DOCS)))
	-rmdir $(DESTDIR)$(DOCDIR) 2>/dev/null
	@if [ -e $(DESTDIR)$(CONF) ] && ! cmp -s server/pgsync-server.conf.example $(DESTDIR)$(CONF); then \
		echo "note: $(DESTDIR)$(CONF) has your settings: left in place"; \
	else \
		rm -f $(DESTDIR)$(CONF); rmdir $(DESTDIR)$(SYSCONFDIR)/pgsync 2>/dev/null || true; \
	fi

clean:
	rm -rf $(B)
	-$(MAKE) -C pg_ext clean 2>/dev/null
	-$(MAKE) -C server clean 2>/dev/null
