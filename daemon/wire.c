#include "wire.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>

json_t *
wire_payload(const void *payload, size_t len, const char **encoding)
{
	json_t *s;
	unsigned char *b64;

	/* json_stringn() refuses invalid UTF-8, which is the test we need. */
	if ((s = json_stringn(len ? payload : "", len)) != NULL) {
		*encoding = "utf8";
		return s;
	}
	*encoding = "base64";
	if ((b64 = malloc((len + 2) / 3 * 4 + 1)) == NULL)
		return NULL;
	EVP_EncodeBlock(b64, payload, (int)len);
	s = json_string((const char *)b64);
	free(b64);
	return s;
}

int
wire_base64_decode(const char *text, size_t len, unsigned char *out, size_t outmax, size_t *outlen)
{
	int n, pad = 0;

	if (len % 4 != 0 || len / 4 * 3 > outmax)
		return -1;
	/* EVP_DecodeBlock would take '=' anywhere: only the last two may be. */
	for (size_t i = 0; i < len; i++) {
		char c = text[i];
		bool alpha = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
		    c == '+' || c == '/';
		if (!alpha && !(c == '=' && i >= len - 2 && (i == len - 1 || text[len - 1] == '=')))
			return -1;
	}
	if (len == 0) {
		*outlen = 0;
		return 0;
	}
	if ((n = EVP_DecodeBlock(out, (const unsigned char *)text, (int)len)) < 0)
		return -1;
	/* EVP_DecodeBlock counts the padding as zero bytes. */
	pad = (text[len - 1] == '=') + (text[len - 2] == '=');
	*outlen = (size_t)n - (size_t)pad;
	return 0;
}

void
wire_time(int64_t unix_ms, char *buf, size_t len)
{
	time_t secs = (time_t)(unix_ms / 1000);
	struct tm tm;
	size_t n;

	gmtime_r(&secs, &tm);
	n = strftime(buf, len, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf + n, len - n, ".%03dZ", (int)(unix_ms % 1000));
}

json_t *
wire_day(const struct store_day *day)
{
	char since[40];

	wire_time(day->since_ms, since, sizeof(since));
	return json_pack("{s:s, s:I, s:I, s:I, s:I}", "since", since,
	    "received", (json_int_t)day->received, "accepted", (json_int_t)day->accepted,
	    "duplicates", (json_int_t)day->duplicates, "possible_repeats", (json_int_t)day->possible_repeats);
}

json_t *
wire_command(const struct stored_command *c)
{
	const char *encoding;
	char when[40];
	json_t *fields = c->fields_json ? json_loads(c->fields_json, 0, NULL) : json_object();
	json_t *payload = wire_payload(c->payload, c->payloadlen, &encoding), *cmd;

	wire_time(c->received_at_ms, when, sizeof(when));
	if (fields == NULL || payload == NULL) {
		json_decref(fields);
		json_decref(payload);
		return NULL;
	}
	cmd = json_pack("{s:s, s:I, s:s, s:o, s:o, s:s, s:i, s:b, s:s}",
	    "type", "command", "id", (json_int_t)c->id, "topic", c->topic, "fields", fields,
	    "payload", payload, "encoding", encoding, "qos", c->qos, "retained", c->retain,
	    "received_at", when);
	if (cmd && c->possible_repeat_of)
		json_object_set_new(cmd, "possible_repeat_of", json_integer((json_int_t)c->possible_repeat_of));
	return cmd;
}

char *
wire_line(const json_t *value, size_t *len)
{
	char *text = json_dumps(value, JSON_COMPACT | JSON_PRESERVE_ORDER), *grown;
	size_t n;

	if (text == NULL)
		return NULL;
	n = strlen(text);
	if ((grown = realloc(text, n + 2)) == NULL) {
		free(text);
		return NULL;
	}
	text = grown;
	text[n] = '\n';
	text[n + 1] = '\0';
	*len = n + 1;
	return text;
}
