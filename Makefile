# cmdrelay: `make` builds, `make check` installs what is missing and runs every test.
PREFIX ?= /usr/local
CC ?= cc
PKGS := libmosquitto sqlite3 yaml-0.1 libsystemd jansson
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
COMMON := log config topic event dedup store mqtt relay
COMMON_OBJS := $(COMMON:%=$(B)/%.o) $(B)/migrations.o
MIGRATIONS := $(sort $(wildcard sql/[0-9][0-9][0-9]_*.sql))

.PHONY: all check unit integration deps demo run clean
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

$(B)/cmdrelayctl: $(B)/cmdrelayctl.o $(COMMON_OBJS)
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
