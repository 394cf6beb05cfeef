/* A named cmdrelay consumer (C, Jansson): handles every command once, in order, acks
 * each one only after handling it, and reconnects with backoff when the relay goes
 * away. cc -o consumer consumer.c -ljansson; usage: consumer [SOCKET [NAME [FILTER]]] */
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#define S(key) json_string_value(json_object_get(msg, key))
static int send_json(int fd, json_t *o) {
	int rc = o && json_dumpfd(o, fd, JSON_COMPACT) == 0 && write(fd, "\n", 1) == 1 ? 0 : -1;
	return json_decref(o), rc;
}
int main(int argc, char *argv[]) {
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	const char *name = argc > 2 ? argv[2] : "lamp", *filter = argc > 3 ? argv[3] : "#";
	json_int_t last = 0, id; /* last id handled: a redelivery of it is acked, not redone */
	char line[70000];        /* the relay's lines carry at most a 64 KiB payload */
	signal(SIGPIPE, SIG_IGN); /* a relay gone away is an error to retry, not a signal */
	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", argc > 1 ? argv[1] : "/run/cmdrelay/cmdrelay.sock");
	for (useconds_t delay = 100000;; usleep(delay), delay = delay < 15000000 ? delay * 2 : 30000000) {
		int fd = socket(AF_UNIX, SOCK_STREAM, 0), acked = 0; FILE *in = fdopen(fd, "r");
		if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == -1 ||
		    send_json(fd, json_pack("{s:s, s:s, s:s}", "op", "hello", "consumer", name, "filter", filter)))
			perror("cmdrelayd");
		for (json_t *msg; acked == 0 && fgets(line, sizeof(line), in); json_decref(msg), delay = 100000) {
			if ((msg = json_loads(line, 0, NULL)) && strcmp(S("type"), "error") == 0)
				return fprintf(stderr, "cmdrelayd: %s: %s\n", S("code"), S("message")), 1;
			if (msg == NULL || strcmp(S("type"), "command") != 0 || (id = json_integer_value(json_object_get(msg, "id"))) < 0)
				continue;
			if (id > last && (printf("%lld %s %s %s\n", (long long)id, S("topic"), S("encoding"), S("payload")) < 0 || fflush(stdout)))
				return perror("stdout"), 1; /* act on the command above, instead of printing it */
			last = id > last ? id : last;
			acked = send_json(fd, json_pack("{s:s, s:I}", "op", "ack", "id", id));
		}
		fclose(in);
	}
}
