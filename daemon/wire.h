/* The JSON shapes of protocol v1 that more than one program writes. */
#ifndef CMDRELAY_WIRE_H
#define CMDRELAY_WIRE_H

#include <stddef.h>

#include <jansson.h>

#include "store.h"

/* A payload as a JSON string: UTF-8 as it is, anything else base64. */
json_t *wire_payload(const void *payload, size_t len, const char **encoding);
/* Strict base64 into out (len / 4 * 3 bytes of room); -1 when text is not base64 or does not fit. */
int wire_base64_decode(const char *text, size_t len, unsigned char *out, size_t outmax, size_t *outlen);
void wire_time(int64_t unix_ms, char *buf, size_t len);	/* 2026-11-25T18:24:44.123Z */
/* {"since":local midnight,"received":...}: the counts of today so far. */
json_t *wire_day(const struct store_day *day);
/* {"type":"command",...} of design.md; NULL on ENOMEM. */
json_t *wire_command(const struct stored_command *c);
/* A JSON value as one protocol line with its newline; free() it. */
char *wire_line(const json_t *value, size_t *len);

#endif
