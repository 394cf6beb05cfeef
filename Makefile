# cmdrelay: `make` builds, `make check` installs what is missing and runs every test.
PREFIX ?= /usr/local
CC ?= cc
PKGS := libmosquitto sqlite3 yaml-0.1 libsystemd jansson libcrypto
PYTHON := /usr/bin/python3

WARN := -Wall -Wextra -Wshadow -Wformat=2 -Wstrict-prototypes -Wmissing-prototypes
ifeq ($(WERROR),1)
WARN += -Werror
endif
CFLAGS ?= -O2 -g
CFLAGS += -std=c11 -D_GNU_SOURCE $(WARN) -Idaemon -Ibuild
PKG_CFLAGS = $(shell pkg-config --cflags $(PKGS))
PKG_LIBS = $(shell pkg-config --libs $(PKGS))

# make check SANITIZE=1 (or make check-sanitize): AddressSanitizer and
# UndefinedBehaviorSanitizer, built in build/asan (not build/), and the tests
# run against those binaries; any report makes the program fail.
ifeq ($(SANITIZE),1)
SANITIZE_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
CFLAGS += $(SANITIZE_FLAGS)
LDFLAGS += $(SANITIZE_FLAGS)
B ?= build/asan
export CMDRELAY_BUILD ?= $(B)
export ASAN_OPTIONS ?= abort_on_error=1:detect_leaks=1
export UBSAN_OPTIONS ?= halt_on_error=1:print_stacktrace=1
# what ASan slows down or inflates past these tests' limits (RSS, slice time,
# the stats reply time of test_lag_is_cheap...)
export PYTEST_ADDOPTS ?= \
	--deselect tests/test_consumers.py::test_never_reading_consumers_do_not_stall_or_grow \
	--deselect tests/test_retention.py::test_max_rows_bounds_the_history \
	--deselect tests/test_bounded.py::test_consumers_that_never_read_hold_bounded_memory \
	--deselect tests/test_bounded.py::test_lag_is_cheap_and_a_replay_is_paced_by_its_reader
endif

B ?= build
COMMON := log config config_lists config_file topic event dedup store store_clock store_ingest store_consumers store_outbox store_session store_dedup store_prune store_salvage store_today store_checkpoint mqtt mqtt_connect relay relay_session relay_status wire server request consumer consumer_admin retention metrics uplink
COMMON_OBJS := $(COMMON:%=$(B)/%.o) $(B)/migrations.o
MIGRATIONS := $(sort $(wildcard sql/[0-9][0-9][0-9]_*.sql))

.PHONY: all check unit integration deps demo run clean install uninstall deb \
	check-sanitize fuzz fuzz-build fuzz-merge valgrind soak bench check-cluster
all: $(B)/cmdrelayd $(B)/cmdrelayctl $(B)/example-consumer

$(B):
	mkdir -p $(B)

$(B)/%.o: daemon/%.c daemon/*.h | $(B)
	$(CC) $(CPPFLAGS) $(CFLAGS) $(PKG_CFLAGS) -c -o $@ $<

$(B)/migrations.c: $(MIGRATIONS) scripts/embed-sql.sh | $(B)
	scripts/embed-sql.sh $(MIGRATIONS) > $@.tmp && mv $@.tmp $@

$(B)/migrations.o: $(B)/migrations.c daemon/migrations.h
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(B)/cmdrelayd: $(B)/cmdrelayd.o $(COMMON_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS)

# The admin CLI reads the config and the history and talks to the socket:
# it links only that, not the daemon.
CTL := cmdrelayctl ctl_history ctl_time ctl_render ctl_socket ctl_tail ctl_consumers log config config_lists config_file topic wire store_today
$(B)/cmdrelayctl: $(CTL:%=$(B)/%.o)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS)

# The C example consumer, built as its users would: one file and Jansson.
$(B)/example-consumer: scripts/examples/consumer.c | $(B)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(shell pkg-config --libs jansson)

UNIT_TESTS := config_tests topic_tests dedup_tests request_tests wire_tests event_tests

$(B)/%_tests: tests/unit/%_tests.c $(COMMON_OBJS)
	$(CC) $(CFLAGS) $(PKG_CFLAGS) $(shell pkg-config --cflags cmocka) -o $@ $^ \
		$(PKG_LIBS) $(shell pkg-config --libs cmocka)

deps:
	scripts/install-deps.sh

unit: $(UNIT_TESTS:%=$(B)/%)
	cd tests/unit && for t in $(UNIT_TESTS); do ../../$(B)/$$t || exit 1; done

integration: all
	$(PYTHON) -m pytest -v -p no:cacheprovider tests/

check: deps
	$(MAKE) all $(UNIT_TESTS:%=$(B)/%)
	$(MAKE) unit
	$(MAKE) integration

# Three RabbitMQ nodes: too heavy for check on two cores; .ci/run runs it.
check-cluster: all
	$(PYTHON) -m pytest -v -s -p no:cacheprovider tests/cluster_rabbitmq.py

demo: deps all
	scripts/demo.sh

run: all
	$(B)/cmdrelayd -c $(or $(CONF),conf/cmdrelay.yaml)

clean:
	rm -rf $(B)

# make install [PREFIX=/usr/local] [DESTDIR=]: the programs to $(PREFIX)/bin,
# the units, sysusers.d and tmpfiles.d files to where pkg-config's systemd.pc
# says, the SQL files and README under $(PREFIX)/share, and the example config
# to /etc/cmdrelay/cmdrelay.yaml only if there is none: an operator's config is
# never overwritten. Without DESTDIR it also creates the user (systemd-sysusers)
# and the directories (systemd-tmpfiles) and reloads systemd.
# make uninstall removes what install put there, except the config (and the
# password file, the user, the history in /var/lib/cmdrelay).
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share/cmdrelay
DOCDIR ?= $(PREFIX)/share/doc/cmdrelay
MANDIR ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
MAN_PAGES := man/cmdrelayd.8 man/cmdrelayctl.1 man/cmdrelay.yaml.5
CONFDIR := /etc/cmdrelay
SYSTEMDUNITDIR ?= $(shell pkg-config --variable=systemdsystemunitdir systemd)
SYSUSERSDIR ?= $(shell pkg-config --variable=sysusersdir systemd)
TMPFILESDIR ?= $(shell pkg-config --variable=tmpfilesdir systemd)
INSTALL ?= install
SQL_FILES := $(wildcard sql/*.sql)
SQL_QUERIES := $(wildcard sql/queries/*.sql)
UNIT_SUBST := -e 's|@bindir@|$(BINDIR)|g' -e 's|@docdir@|$(DOCDIR)|g'

install: all
	@test -n "$(SYSTEMDUNITDIR)" -a -n "$(SYSUSERSDIR)" -a -n "$(TMPFILESDIR)" || \
		{ echo "install: pkg-config does not know systemd's directories (is systemd.pc installed?)" >&2; exit 1; }
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(DATADIR)/sql $(DESTDIR)$(DOCDIR) \
		$(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(BASHCOMPDIR)
	$(INSTALL) -m 0755 $(B)/cmdrelayd $(B)/cmdrelayctl $(DESTDIR)$(BINDIR)/
	for m in $(MAN_PAGES); do \
		$(INSTALL) -m 0644 $$m $(DESTDIR)$(MANDIR)/man$${m##*.}/ || exit 1; \
	done
	$(INSTALL) -m 0644 scripts/cmdrelayctl.bash-completion $(DESTDIR)$(BASHCOMPDIR)/cmdrelayctl
	for u in cmdrelayd.service cmdrelayd.socket; do \
		sed $(UNIT_SUBST) systemd/$$u.in > $(DESTDIR)$(SYSTEMDUNITDIR)/$$u.tmp && \
		chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/$$u.tmp && \
		mv -f $(DESTDIR)$(SYSTEMDUNITDIR)/$$u.tmp $(DESTDIR)$(SYSTEMDUNITDIR)/$$u || exit 1; \
	done
	$(INSTALL) -m 0644 systemd/cmdrelay.sysusers $(DESTDIR)$(SYSUSERSDIR)/cmdrelay.conf
	$(INSTALL) -m 0644 systemd/cmdrelay.tmpfiles $(DESTDIR)$(TMPFILESDIR)/cmdrelay.conf
	$(if $(SQL_FILES),$(INSTALL) -m 0644 $(SQL_FILES) $(DESTDIR)$(DATADIR)/sql/)
	$(if $(SQL_QUERIES),$(INSTALL) -d $(DESTDIR)$(DATADIR)/sql/queries)
	$(if $(SQL_QUERIES),$(INSTALL) -m 0644 $(SQL_QUERIES) $(DESTDIR)$(DATADIR)/sql/queries/)
	$(INSTALL) -m 0644 README.md $(DESTDIR)$(DOCDIR)/
	$(INSTALL) -d -m 0750 $(DESTDIR)$(CONFDIR)
	@if [ -e $(DESTDIR)$(CONFDIR)/cmdrelay.yaml ]; then \
		echo "install: keeping the existing $(DESTDIR)$(CONFDIR)/cmdrelay.yaml (example: conf/cmdrelay.yaml)"; \
	else \
		echo "$(INSTALL) -m 0640 conf/cmdrelay.yaml $(DESTDIR)$(CONFDIR)/cmdrelay.yaml"; \
		$(INSTALL) -m 0640 conf/cmdrelay.yaml $(DESTDIR)$(CONFDIR)/cmdrelay.yaml; \
	fi
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then \
		set -x; \
		systemd-sysusers cmdrelay.conf && systemd-tmpfiles --create cmdrelay.conf || exit 1; \
		if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi; \
	fi
	@echo "install: edit $(CONFDIR)/cmdrelay.yaml, then: systemctl enable --now cmdrelayd.service"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/cmdrelayd $(DESTDIR)$(BINDIR)/cmdrelayctl
	rm -f $(DESTDIR)$(SYSTEMDUNITDIR)/cmdrelayd.service $(DESTDIR)$(SYSTEMDUNITDIR)/cmdrelayd.socket
	rm -f $(DESTDIR)$(SYSUSERSDIR)/cmdrelay.conf $(DESTDIR)$(TMPFILESDIR)/cmdrelay.conf
	rm -rf $(DESTDIR)$(DATADIR) $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(MANDIR)/man8/cmdrelayd.8 $(DESTDIR)$(MANDIR)/man1/cmdrelayctl.1 \
		$(DESTDIR)$(MANDIR)/man5/cmdrelay.yaml.5 $(DESTDIR)$(BASHCOMPDIR)/cmdrelayctl
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "uninstall: kept $(DESTDIR)$(CONFDIR) (config, password), the user cmdrelay and /var/lib/cmdrelay (history); remove them by hand"

# make deb: the Debian package (debian/, debhelper), built by
# dpkg-buildpackage -us -uc -b in a copy of the tree under build/deb/src, so
# that its products land in build/deb/ rather than beside the tree, and
# checked by lintian (its report in build/deb/lintian.txt; an error fails).
DEB_DIR := build/deb
deb:
	rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	tar --exclude=./build --exclude=./.git -cf - . | tar -C $(DEB_DIR)/src -xf -
	cd $(DEB_DIR)/src && DEB_BUILD_OPTIONS="parallel=$$(nproc) $$DEB_BUILD_OPTIONS" \
		dpkg-buildpackage -us -uc -b
	lintian --fail-on error --info $(DEB_DIR)/*.changes > $(DEB_DIR)/lintian.txt 2>&1; \
		rc=$$?; cat $(DEB_DIR)/lintian.txt; exit $$rc

# ---- sanitizers, fuzzing, valgrind -------------------------------------------
# make check-sanitize: make check with SANITIZE=1 (see the top), in build/asan.
check-sanitize:
	$(MAKE) check SANITIZE=1

# make fuzz [FUZZ_SECONDS=60]: the libFuzzer targets of tests/fuzz/ (config
# loader, topic fields and filters, consumer request lines), built with clang,
# ASan and UBSan from daemon/*.c into build/fuzz/, each run for FUZZ_SECONDS
# from its kept corpus tests/fuzz/corpus/TARGET; fails when one finds a crash,
# a leak, a timeout or undefined behaviour (the input is in build/fuzz/artifacts/).
# make fuzz-merge: adds to the kept corpora the inputs of the last run that
# reach new code (libFuzzer -merge=1).
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := config topic request
FB := build/fuzz
FUZZ_BINS := $(FUZZ_TARGETS:%=$(FB)/fuzz_%)
FUZZ_CFLAGS := -g -O1 -std=c11 -D_GNU_SOURCE -Wall -Wextra -Idaemon \
	-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer

$(FB):
	mkdir -p $(FB)

$(FB)/%.o: daemon/%.c daemon/*.h | $(FB)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link $(PKG_CFLAGS) -c -o $@ $<

$(FB)/fuzz_config: tests/fuzz/fuzz_config.c $(FB)/config.o $(FB)/config_lists.o $(FB)/config_file.o $(FB)/log.o $(FB)/topic.o
$(FB)/fuzz_topic: tests/fuzz/fuzz_topic.c $(FB)/topic.o
$(FB)/fuzz_request: tests/fuzz/fuzz_request.c $(FB)/request.o $(FB)/wire.o
$(FUZZ_BINS): | $(FB)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $(PKG_CFLAGS) -o $@ $^ $(PKG_LIBS)

fuzz-build: $(FUZZ_BINS)

fuzz: deps
	$(MAKE) fuzz-build
	tests/fuzz/run.sh $(FUZZ_SECONDS) $(FB) $(FUZZ_TARGETS)

fuzz-merge: fuzz-build
	for t in $(FUZZ_TARGETS); do \
		$(FB)/fuzz_$$t -merge=1 tests/fuzz/corpus/$$t $(FB)/corpus/$$t || exit 1; \
	done

# make valgrind: the integration suite with cmdrelayd and cmdrelayctl under
# valgrind memcheck: build/valgrind/ holds scripts of those names that exec
# the programs of build/ under $(VALGRIND), and the tests run them
# (CMDRELAY_BUILD). A memory error or a definite or indirect leak makes the
# program exit 99, which fails the test. VALGRIND_TESTS deselects what is too
# slow under valgrind (the 20,000 to 200,000 command streams) or measures what
# it changes (time limits, RSS); the rest takes about 30 minutes.
VALGRIND ?= valgrind -q --leak-check=full --show-leak-kinds=definite,indirect \
	--errors-for-leak-kinds=definite,indirect --error-exitcode=99
VALGRIND_TESTS ?= \
	--deselect tests/test_consumers.py::test_never_reading_consumers_do_not_stall_or_grow \
	--deselect tests/test_retention.py::test_max_rows_bounds_the_history \
	--deselect tests/test_bounded.py::test_consumers_that_never_read_hold_bounded_memory \
	--deselect tests/test_faults.py::test_kill9_during_stream_with_consumers \
	--deselect tests/test_faults.py::test_broker_restart_mid_stream \
	--deselect tests/test_admin.py::test_history_while_a_writer_holds_a_transaction
VG_B := build/valgrind

valgrind: deps
	$(MAKE) all
	mkdir -p $(VG_B)
	for p in cmdrelayd cmdrelayctl; do \
		printf '#!/bin/sh\nexec %s "%s" "$$@"\n' '$(VALGRIND)' "$(CURDIR)/$(B)/$$p" > $(VG_B)/$$p.tmp && \
		chmod 0755 $(VG_B)/$$p.tmp && mv -f $(VG_B)/$$p.tmp $(VG_B)/$$p || exit 1; \
	done
	CMDRELAY_BUILD=$(VG_B) $(PYTHON) -m pytest -v -p no:cacheprovider $(VALGRIND_TESTS) tests/

# make soak [SOAK_ARGS="--minutes 30 --broker mosquitto|rabbitmq|both --seed N"]:
# kill -9, broker restarts and consumer kills at random for 30 minutes
# (scripts/soak.py); exits non-zero at the first loss or repeat.
soak: deps
	$(MAKE) all
	$(PYTHON) scripts/soak.py $(SOAK_ARGS)

# ---- benchmark -----------------------------------------------------------------
# make bench (never part of make check): scripts/bench against private
# Mosquitto and RabbitMQ brokers: backlog drain versus mosquitto_sub, live
# latency and sustained rate, footprint; prints the table and writes it to
# bench/results.md. Under 10 minutes on 2 cores. BENCH_ARGS: e.g. --quick.
bench: deps
	$(MAKE) all
	$(PYTHON) scripts/bench $(BENCH_ARGS)
