/*
 * ws.c — GET /v1/ws: change notifications over WebSocket (RFC 6455).
 *
 * Only what a notification channel needs: the opening handshake (a small
 * SHA-1 below: it only proves to the browser that we read its key, so a
 * crypto library dependency is not worth it), unfragmented server text frames, and reading client
 * frames to answer pings, echo a close and notice dead peers. No extensions, no subprotocol beyond
 * echoing "pgsync.v1". libmicrohttpd does the HTTP part and hands the socket over
 * (MHD_create_response_for_upgrade); from then on one thread owns every upgraded socket through
 * epoll, so no socket is ever touched by two threads, and writes are non-blocking with a small
 * bounded queue per client (a client that does not read is disconnected).
 *
 * Other threads talk to this one only through `pending` (new sockets, under
 * a mutex), each database's ws_version (the newest version announced to its
 * WebSockets, atomic) and an eventfd. A client hears only its database.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>
#include <microhttpd.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define IN_MAX (65536 + 14)
#define OUT_MAX 65536

typedef struct client
{
	struct client					 *prev, *next;
	int								  fd;
	struct MHD_UpgradeResponseHandle *urh;
	uint8_t							 *in; /* grows up to IN_MAX: idle clients stay small */
	size_t							  inlen;
	size_t							  incap;
	uint8_t							 *out;
	size_t							  outlen;
	int64_t							  last_rx;
	int64_t							  last_ping;
	int64_t							  exp;	/* token expiry, Unix seconds; 0 = none */
	int64_t							  sent; /* last version announced to it */
	srv_db							 *db;
	bool							  closing;
	bool							  want_out;
} client;

static client		  *clients; /* ws thread only */
static client		  *pending; /* under pending_mu */
static pthread_mutex_t pending_mu = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool	   stop_flag;
static int			   epfd = -1, evfd = -1;
static pthread_t	   tid;
static bool			   started;

static void
kick(void)
{
	uint64_t one = 1;

	if (evfd >= 0 && write(evfd, &one, sizeof one) < 0 && errno != EAGAIN)
		srv_log("WARNING", "ws: cannot wake the WebSocket thread: %s", strerror(errno));
}

void
ws_broadcast(srv_db *db, int64_t version)
{
	long long cur = atomic_load(&db->ws_version);

	while (version > cur && !atomic_compare_exchange_weak(&db->ws_version, &cur, version))
		;
	kick();
}

/* ws_accept_key: base64(sha1(key + GUID)), RFC 6455 section 4.2.2; SHA-1 and
 * base64 from GnuTLS, which the server links for TLS. A key that does not
 * fit (the caller checks it is 24 characters) gives an empty string. */
void
ws_accept_key(const char *key, char out[29])
{
	char		   buf[128];
	uint8_t		   md[20];
	gnutls_datum_t raw = {md, sizeof md}, b64 = {NULL, 0};
	int			   n = snprintf(buf, sizeof buf, "%s" WS_GUID, key);

	out[0] = '\0';
	if (n < 0 || (size_t) n >= sizeof buf ||
		gnutls_hash_fast(GNUTLS_DIG_SHA1, buf, (size_t) n, md) < 0 ||
		gnutls_base64_encode2(&raw, &b64) < 0)
		return;
	if (b64.size == 28)
	{
		memcpy(out, b64.data, 28);
		out[28] = '\0';
	}
	gnutls_free(b64.data);
}

/* ---- frames --------------------------------------------------------------- */

/* queue appends a server frame (never masked) to c's output. */
static void
queue(client *c, int opcode, const void *data, size_t n)
{
	uint8_t	 hdr[4];
	size_t	 h = 2;
	uint8_t *o;

	if (c->closing && opcode != 0x8)
		return;
	hdr[0] = (uint8_t) (0x80 | opcode);
	if (n < 126)
		hdr[1] = (uint8_t) n;
	else
	{
		hdr[1] = 126;
		hdr[2] = (uint8_t) (n >> 8);
		hdr[3] = (uint8_t) n;
		h = 4;
	}
	if (c->outlen + h + n > OUT_MAX || !(o = realloc(c->out, c->outlen + h + n)))
	{
		c->closing = true; /* not reading: let it go */
		c->outlen = 0;
		return;
	}
	c->out = o;
	memcpy(c->out + c->outlen, hdr, h);
	memcpy(c->out + c->outlen + h, data, n);
	c->outlen += h + n;
}

static void
queue_close(client *c, int code, const char *reason)
{
	uint8_t b[64];
	size_t	n = strlen(reason) < 60 ? strlen(reason) : 60;

	b[0] = (uint8_t) (code >> 8);
	b[1] = (uint8_t) code;
	memcpy(b + 2, reason, n);
	queue(c, 0x8, b, n + 2);
	c->closing = true;
}

static void
queue_version(client *c, const char *type, int64_t v)
{
	char msg[160];
	int	 n;

	if (strcmp(type, "hello") == 0)
	{
		char site[37];

		pool_server_site(c->db, site);
		n = snprintf(msg, sizeof msg,
					 "{\"type\":\"hello\",\"version\":%lld,\"server_site\":\"%s\"}", (long long) v,
					 site);
	}
	else
		n = snprintf(msg, sizeof msg, "{\"type\":\"changes\",\"version\":%lld}", (long long) v);
	queue(c, 0x1, msg, (size_t) n);
	c->sent = v;
}

/* flush writes what the socket takes; false when the peer is gone. */
static bool
flush(client *c)
{
	while (c->outlen)
	{
		ssize_t n = send(c->fd, c->out, c->outlen, MSG_NOSIGNAL | MSG_DONTWAIT);

		if (n < 0)
		{
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				break;
			if (errno == EINTR)
				continue;
			return false;
		}
		memmove(c->out, c->out + n, c->outlen - (size_t) n);
		c->outlen -= (size_t) n;
	}
	if ((c->outlen > 0) != c->want_out)
	{
		struct epoll_event ev = {.events = EPOLLIN | (c->outlen ? EPOLLOUT : 0), .data.ptr = c};

		c->want_out = c->outlen > 0;
		epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
	}
	return true;
}

/* parse consumes complete client frames from c->in. */
static void
parse(client *c)
{
	size_t pos = 0;

	while (!c->closing)
	{
		uint8_t *p = c->in + pos;
		size_t	 avail = c->inlen - pos, h = 2;
		uint64_t len;
		int		 op;
		bool	 fin;

		if (avail < 2)
			break;
		fin = p[0] & 0x80;
		op = p[0] & 0x0f;
		if (!(p[1] & 0x80))
		{
			queue_close(c, 1002, "client frames must be masked");
			break;
		}
		len = p[1] & 0x7f;
		if (len == 126)
		{
			if (avail < 4)
				break;
			len = (uint64_t) p[2] << 8 | p[3];
			h = 4;
		}
		else if (len == 127)
		{
			if (avail < 10)
				break;
			len = 0;
			for (int i = 0; i < 8; i++)
				len = len << 8 | p[2 + i];
			h = 10;
		}
		if (len > IN_MAX - 14)
		{
			queue_close(c, 1009, "message too big");
			break;
		}
		if (avail < h + 4 + len)
			break;
		for (uint64_t i = 0; i < len; i++)
			p[h + 4 + i] ^= p[h + (i & 3)];
		if (op >= 0x8 && (len > 125 || !fin))
		{
			queue_close(c, 1002, "bad control frame");
			break;
		}
		switch (op)
		{
			case 0x8: /* close: echo the code and go */
				queue(c, 0x8, p + h + 4, len >= 2 ? 2 : 0);
				c->closing = true;
				break;
			case 0x9:
				queue(c, 0xA, p + h + 4, (size_t) len);
				break;
			case 0x0:
			case 0x1:
			case 0x2:
			case 0xA:
				break; /* data and pongs: read and ignored */
			default:
				queue_close(c, 1002, "unknown opcode");
				break;
		}
		pos += h + 4 + (size_t) len;
	}
	if (pos && c->inlen > pos)
		memmove(c->in, c->in + pos, c->inlen - pos);
	c->inlen -= pos;
}

/* ---- client lifetime (ws thread) ------------------------------------------ */

static void
drop(client *c)
{
	epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
	if (c->prev)
		c->prev->next = c->next;
	else
		clients = c->next;
	if (c->next)
		c->next->prev = c->prev;
	MHD_upgrade_action(c->urh, MHD_UPGRADE_ACTION_CLOSE);
	atomic_fetch_sub(&c->db->ws_clients, 1);
	free(c->in);
	free(c->out);
	free(c);
}

static void
adopt_pending(void)
{
	client *list;

	pthread_mutex_lock(&pending_mu);
	list = pending;
	pending = NULL;
	pthread_mutex_unlock(&pending_mu);
	while (list)
	{
		client			  *c = list;
		struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};

		list = c->next;
		c->prev = NULL;
		c->next = clients;
		if (clients)
			clients->prev = c;
		clients = c;
		if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) != 0)
		{
			srv_log("WARNING", "ws: epoll_ctl: %s", strerror(errno));
			drop(c);
			continue;
		}
		{
			int64_t b = atomic_load(&c->db->ws_version), h = hub_version(c->db);

			queue_version(c, "hello", b > h ? b : h);
		}
		parse(c); /* bytes that came with the upgrade request */
		if (!flush(c) || (c->closing && !c->outlen))
			drop(c);
	}
}

static void
on_readable(client *c)
{
	for (;;)
	{
		ssize_t n;

		if (c->inlen == c->incap)
		{
			size_t	 cap = c->incap < 512 ? 512 : c->incap * 2;
			uint8_t *b;

			if (c->incap >= IN_MAX || !(b = realloc(c->in, cap < IN_MAX ? cap : IN_MAX)))
			{
				queue_close(c, 1009, "message too big");
				return;
			}
			c->in = b;
			c->incap = cap < IN_MAX ? cap : IN_MAX;
		}
		n = recv(c->fd, c->in + c->inlen, c->incap - c->inlen, MSG_DONTWAIT);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
		{
			c->closing = true;
			c->outlen = 0;
			return;
		}
		if (n < 0)
			return;
		c->inlen += (size_t) n;
		c->last_rx = srv_now_ms();
		parse(c);
		if (c->closing)
			return;
	}
}

/* housekeeping: announcements, pings, dead peers, expired tokens. */
static void
tick(int64_t now, bool shutting_down)
{
	int64_t wall = srv_wall_s();

	for (client *c = clients, *n; c; c = n)
	{
		int64_t v = atomic_load(&c->db->ws_version);

		n = c->next;
		if (shutting_down)
			queue_close(c, 1001, "server shutting down");
		else if (c->exp && wall > c->exp + cfg.jwt_leeway)
			queue_close(c, 4001, "token expired");
		else if (now - c->last_rx > 3000LL * cfg.ws_ping_s)
		{
			c->closing = true; /* silent for 3 ping periods: gone */
			c->outlen = 0;
		}
		else
		{
			if (v > c->sent)
				queue_version(c, "changes", v);
			if (now - c->last_ping >= 1000LL * cfg.ws_ping_s)
			{
				queue(c, 0x9, "", 0);
				c->last_ping = now;
			}
		}
		if (!flush(c) || (c->closing && !c->outlen))
			drop(c);
	}
}

static void *
ws_main(void *arg)
{
	struct epoll_event evs[64];
	int64_t			   last_tick = 0;

	(void) arg;
	while (!atomic_load(&stop_flag))
	{
		int		n = epoll_wait(epfd, evs, 64, 1000);
		bool	announce = false;
		int64_t now = srv_now_ms();

		for (int i = 0; i < n; i++)
		{
			client *c = evs[i].data.ptr;

			if (!c)
			{
				uint64_t x;

				if (read(evfd, &x, sizeof x) < 0 && errno != EAGAIN)
					srv_log("WARNING", "ws: eventfd read: %s", strerror(errno));
				announce = true;
				continue;
			}
			if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
				on_readable(c);
			if (!flush(c) || (c->closing && !c->outlen))
				drop(c);
		}
		if (announce)
			adopt_pending();
		if (announce || now - last_tick >= 1000)
		{
			tick(now, false);
			last_tick = now;
		}
	}
	adopt_pending();
	tick(srv_now_ms(), true);
	while (clients)
		drop(clients); /* best effort: close frames were queued */
	return NULL;
}

/* ---- upgrade (libmicrohttpd threads) -------------------------------------- */

static void
on_upgrade(void *cls, struct MHD_Connection *conn, void *req_cls, const char *extra_in,
		   size_t extra_in_size, MHD_socket sock, struct MHD_UpgradeResponseHandle *urh)
{
	client *c = calloc(1, sizeof *c);
	int		fl;

	(void) conn, (void) req_cls;
	if (c && extra_in_size && extra_in_size <= IN_MAX && (c->in = malloc(extra_in_size)) != NULL)
		c->incap = extra_in_size;
	if (!c || (extra_in_size && !c->in) || atomic_load(&stop_flag))
	{
		if (c)
			free(c->in);
		free(c);
		MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
		return;
	}
	fl = fcntl(sock, F_GETFL);
	fcntl(sock, F_SETFL, fl | O_NONBLOCK);
	c->fd = sock;
	c->urh = urh;
	/* the closure pointer carries the token's expiry and the database (ws_upgrade) */
	c->exp = (int64_t) ((intptr_t) cls >> 8);
	c->db = &cfg.dbs[(intptr_t) cls & 0xff];
	c->last_rx = c->last_ping = srv_now_ms();
	if (extra_in_size)
		memcpy(c->in, extra_in, extra_in_size);
	c->inlen = extra_in_size;
	atomic_fetch_add(&c->db->ws_clients, 1);
	pthread_mutex_lock(&pending_mu);
	c->next = pending;
	pending = c;
	pthread_mutex_unlock(&pending_mu);
	kick();
}

static bool
has_token(const char *list, const char *tok)
{
	size_t n = strlen(tok);

	for (const char *p = list; p && *p;)
	{
		while (*p == ' ' || *p == ',' || *p == '\t')
			p++;
		if (strncasecmp(p, tok, n) == 0 &&
			(p[n] == '\0' || p[n] == ',' || p[n] == ' ' || p[n] == '\t'))
			return true;
		p = strchr(p, ',');
	}
	return false;
}

bool
ws_upgrade(struct MHD_Connection *conn, srv_db *db, const auth_info *a, struct MHD_Response **resp,
		   srv_error *e)
{
	const char *upgrade = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Upgrade");
	const char *connection = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Connection");
	const char *version =
		MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Sec-WebSocket-Version");
	const char *key = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Sec-WebSocket-Key");
	const char *proto =
		MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Sec-WebSocket-Protocol");
	char accept[29];

	if (!upgrade || !has_token(upgrade, "websocket") || !connection ||
		!has_token(connection, "upgrade"))
		return srv_fail(e, 426, "websocket upgrade required",
						"Connect with a WebSocket client (RFC 6455).",
						"GET /v1/ws needs Upgrade: websocket and Connection: Upgrade.");
	if (!version || strcmp(version, "13") != 0)
		return srv_fail(e, 426, "unsupported websocket version",
						"Use WebSocket version 13 (RFC 6455).", "Sec-WebSocket-Version is \"%s\".",
						version ? version : "");
	if (!key || strlen(key) != 24)
		return srv_fail(e, 400, "bad websocket key", NULL,
						"Sec-WebSocket-Key must be 16 bytes in base64.");
	if (atomic_load(&stop_flag))
		return srv_fail(e, 503, "server shutting down", "Reconnect in a moment.", NULL);
	ws_accept_key(key, accept);
	if (!accept[0])
		return srv_fail(e, 500, "websocket handshake failed", "Retry; report it if it persists.",
						"The crypto library could not hash the key.");
	/* the token's expiry (below 2^38: auth.c caps it at the year 9999) and the
	 * database's index (below 256) travel in the closure pointer itself */
	_Static_assert(sizeof(intptr_t) >= sizeof(int64_t), "needs 64-bit pointers");
	_Static_assert(SRV_MAX_DBS <= 256, "the database index takes 8 bits");
	*resp =
		MHD_create_response_for_upgrade(on_upgrade, (void *) (intptr_t) (a->exp << 8 | db->index));
	if (!*resp)
		return srv_fail(e, 500, "internal error", NULL, "Cannot create the upgrade response.");
	MHD_add_response_header(*resp, MHD_HTTP_HEADER_UPGRADE, "websocket");
	MHD_add_response_header(*resp, "Sec-WebSocket-Accept", accept);
	if (proto && has_token(proto, "pgsync.v1"))
		MHD_add_response_header(*resp, "Sec-WebSocket-Protocol", "pgsync.v1");
	return true;
}

bool
ws_start(void)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};

	epfd = epoll_create1(EPOLL_CLOEXEC);
	evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (epfd < 0 || evfd < 0 || epoll_ctl(epfd, EPOLL_CTL_ADD, evfd, &ev) != 0)
		return false;
	if (pthread_create(&tid, NULL, ws_main, NULL) != 0)
		return false;
	started = true;
	return true;
}

/* ws_stop closes every WebSocket (1001) and ends the thread; must run
 * before the HTTP daemon stops (it owns the upgraded sockets). */
void
ws_stop(void)
{
	if (!started)
		return;
	atomic_store(&stop_flag, true);
	kick();
	pthread_join(tid, NULL);
	/* an upgrade that completed while the thread was exiting */
	pthread_mutex_lock(&pending_mu);
	while (pending)
	{
		client *c = pending;

		pending = c->next;
		MHD_upgrade_action(c->urh, MHD_UPGRADE_ACTION_CLOSE);
		atomic_fetch_sub(&c->db->ws_clients, 1);
		free(c->in);
		free(c);
	}
	pthread_mutex_unlock(&pending_mu);
	close(epfd);
	close(evfd);
	epfd = evfd = -1;
	started = false;
}
