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

B := build
COMMON := log config topic event dedup store mqtt relay wire server request consumer retention metrics
COMMON_OBJS := $(COMMON:%=$(B)/%.o) $(B)/migrations.o
MIGRATIONS := $(sort $(wildcard sql/[0-9][0-9][0-9]_*.sql))

.PHONY: all check unit integration deps demo run clean install uninstall
all: $(B)/cmdrelayd $(B)/cmdrelayctl

$(B):
	mkdir -p $(B)

$(B)/%.o: daemon/%.c daemon/*.h | $(B)
	$(CC) $(CFLAGS) $(PKG_CFLAGS) -c -o $@ $<

$(B)/migrations.c: $(MIGRATIONS) scripts/embed-sql.sh | $(B)
	scripts/embed-sql.sh $(MIGRATIONS) > $@.tmp && mv $@.tmp $@

$(B)/migrations.o: $(B)/migrations.c daemon/migrations.h
	$(CC) $(CFLAGS) -c -o $@ $<

$(B)/cmdrelayd: $(B)/cmdrelayd.o $(COMMON_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS)

$(B)/cmdrelayctl: $(B)/cmdrelayctl.o $(B)/ctl_socket.o $(COMMON_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(PKG_LIBS)

$(B)/unit_tests: tests/unit/unit_tests.c $(COMMON_OBJS)
	$(CC) $(CFLAGS) $(PKG_CFLAGS) $(shell pkg-config --cflags cmocka) -o $@ $^ \
		$(PKG_LIBS) $(shell pkg-config --libs cmocka)

deps:
	scripts/install-deps.sh

unit: $(B)/unit_tests
	cd tests/unit && ../../$(B)/unit_tests

integration: all
	$(PYTHON) -m pytest -v -p no:cacheprovider tests/

check: deps
	$(MAKE) all $(B)/unit_tests
	$(MAKE) unit
	$(MAKE) integration

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
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(DATADIR)/sql $(DESTDIR)$(DOCDIR)
	$(INSTALL) -m 0755 $(B)/cmdrelayd $(B)/cmdrelayctl $(DESTDIR)$(BINDIR)/
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
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "uninstall: kept $(DESTDIR)$(CONFDIR) (config, password), the user cmdrelay and /var/lib/cmdrelay (history); remove them by hand"
