/*
 * The one rendering of payloads (and of other bytes from outside) for
 * people: every cmdrelayctl printer uses it, and --escaped reads it back.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

/* \xNN: the widest a unit renders. */
#define RENDER_UNIT_MAX 4

/* Bytes in a valid UTF-8 sequence at p (at most len), 0 when it is not one. */
static int
render_utf8_sequence(const unsigned char *p, size_t len)
{
	size_t n = p[0] >= 0xf0 && p[0] <= 0xf4 ? 4 : p[0] >= 0xe0 ? 3 : p[0] >= 0xc2 && p[0] <= 0xdf ? 2 : 0;

	if (n == 0 || n > len)
		return 0;
	for (size_t i = 1; i < n; i++)
		if ((p[i] & 0xc0) != 0x80)
			return 0;
	if ((p[0] == 0xe0 && p[1] < 0xa0) || (p[0] == 0xed && p[1] > 0x9f) ||
	    (p[0] == 0xf0 && p[1] < 0x90) || (p[0] == 0xf4 && p[1] > 0x8f))
		return 0;	/* overlong, surrogate, beyond U+10FFFF */
	return (int)n;
}

/*
 * One unit at p: into text (RENDER_UNIT_MAX + 1 bytes) as it shows;
 * returns the bytes of p it took, *width its characters on the screen.
 * C1 controls (0xc2 0x80..0x9f; 0xc2 0x9b is CSI) are escapes for a
 * terminal as much as C0 and DEL are.
 */
static size_t
render_unit(const unsigned char *p, size_t len, char *text, int *width)
{
	int n = p[0] >= 0x80 ? render_utf8_sequence(p, len) : 0;

	if (p[0] == '\\') {
		memcpy(text, "\\\\", 3);
		*width = 2;
		return 1;
	}
	if (p[0] >= 0x20 && p[0] < 0x7f) {
		text[0] = (char)p[0];
		text[1] = '\0';
		*width = 1;
		return 1;
	}
	if (n > 0 && !(n == 2 && p[0] == 0xc2 && p[1] < 0xa0)) {
		memcpy(text, p, (size_t)n);
		text[n] = '\0';
		*width = 1;
		return (size_t)n;
	}
	snprintf(text, RENDER_UNIT_MAX + 1, "\\x%02x", p[0]);
	*width = 4;
	return 1;
}

int
ctl_render(FILE *out, const void *bytes, size_t len, int width)
{
	const unsigned char *p = bytes;
	char text[RENDER_UNIT_MAX + 1];
	int w, total = 0, limit;
	size_t i, n;

	for (i = 0; width > 0 && i < len && total <= width; total += w)
		i += render_unit(p + i, len - i, text, &w);
	limit = width > 0 && total > width ? width - 3 : -1;
	for (i = 0, total = 0; i < len; i += n) {
		n = render_unit(p + i, len - i, text, &w);
		if (limit >= 0 && total + w > limit)
			break;
		fputs(text, out);
		total += w;
	}
	if (i < len) {
		fputs("...", out);
		total += 3;
	}
	return total;
}

static int
render_hex_digit(char c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 :
	    c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

int
ctl_unescape(const char *text, unsigned char *out, size_t *outlen)
{
	size_t o = 0;

	for (const char *p = text; *p; p++) {
		if (*p != '\\') {
			out[o++] = (unsigned char)*p;
			continue;
		}
		if (p[1] == '\\') {
			out[o++] = '\\';
			p++;
		} else if (p[1] == 'x' && render_hex_digit(p[2]) >= 0 && render_hex_digit(p[3]) >= 0) {
			out[o++] = (unsigned char)(render_hex_digit(p[2]) * 16 + render_hex_digit(p[3]));
			p += 3;
		} else {
			*outlen = (size_t)(p - text);	/* where the bad escape stands */
			return -1;
		}
	}
	*outlen = o;
	return 0;
}
