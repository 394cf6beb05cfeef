/*
 * libFuzzer target: the YAML config loader (daemon/config.c).
 *
 * The input is the content of a config file. config_load() takes a path, so
 * the input goes into a memfd that is opened again through /proc/self/fd/N.
 * A loaded config must come with an empty error, a failure with a message
 * naming the file; config_free() must release everything (LeakSanitizer).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "config.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int memfd = -1;
static char path[64];

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	(void)argc;
	(void)argv;
	/* the systemd credential would win over broker.password_file */
	unsetenv("CREDENTIALS_DIRECTORY");
	if ((memfd = memfd_create("fuzz-config.yaml", MFD_CLOEXEC)) == -1) {
		perror("memfd_create");
		abort();
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", memfd);
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct config *cfg = NULL;
	char err[CONFIG_ERR_MAX];
	int rc;

	if (size > 64 * 1024)
		return -1;	/* not worth the time: a config is small */
	if (ftruncate(memfd, 0) == -1 || pwrite(memfd, data, size, 0) != (ssize_t)size) {
		perror("memfd write");
		abort();
	}
	err[0] = '\0';
	rc = config_load(path, &cfg, err, sizeof(err));
	if (rc == 0) {
		if (cfg == NULL || cfg->broker.client_id == NULL || cfg->nsubs == 0 ||
		    cfg->subs == NULL || cfg->topic_fields == NULL || cfg->store.path == NULL ||
		    cfg->socket.path == NULL)
			abort();	/* a loaded config lacks a required or defaulted value */
		for (size_t i = 0; i < cfg->nsubs; i++)
			if (cfg->subs[i].topic == NULL || cfg->subs[i].qos < 0 || cfg->subs[i].qos > 1)
				abort();
		config_free(cfg);
	} else {
		if (rc != -1 || memchr(err, '\0', sizeof(err)) == NULL ||
		    strncmp(err, path, strlen(path)) != 0)
			abort();	/* a failure must say what, in "FILE:..." form */
	}
	return 0;
}
