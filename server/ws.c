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
 * WebSockets, atomic), `inbox` (subscriptions' finished pulls, under a
 * mutex) and an eventfd. A client hears only its database.
 *
 * Subscriptions (docs/PROTOCOL.md, "Payloads over the WebSocket"): a client
 * that sent {"type":"subscribe"} gets the payloads themselves. Its pulls are
 * ordinary pull jobs (work.c) without an HTTP connection: the announcement
 * that wakes a thousand subscribers queues their thousand jobs under one
 * lock, so those with the same view are answered by one computation, as
 * parked long-polls are. At most one job per client is out; the client's
 * memory outlives its socket until that job comes back (`zombie`).
 */
#include "server.h"

#include "../core/pgsync.h"

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

#include <cjson/cJSON.h>
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
	int64_t							  sent; /* last version announced to it */
	srv_db							 *db;
	bool							  closing;
	bool							  want_out;
	/* the subscription: the pull it makes next, as a device's pull would */
	auth_info auth; /* the upgrade request's token (a copy) */
	bool	  subscribed;
	bool	  want_pull; /* something to pull: the catch-up, an announcement, a chunk */
	bool	  inflight;	 /* job is with the workers */
	bool	  zombie;	 /* dropped while inflight: freed when the job comes back */
	uint32_t  epoch;	 /* bumped by each (un)subscribe: older jobs' answers are dropped */
	uint32_t  job_epoch;
	int64_t	  since;
	int32_t	  gen;
	uint8_t	 *sealed; /* a chunk cursor's sealed part (PGS_MAX_SEALED bytes), or NULL */
	size_t	  sealed_len;
	uint32_t  max_rows;
	char	  exclude[37];
	char	  job_exclude[37]; /* the running job's copy */
	int64_t	  retry_at;		   /* the server was busy: pull again from then on */
	int64_t	  last_pull;	   /* srv_now_ms() of the last pull queued */
	/* a payload being sent, from the shared answer itself (no copy per
	 * socket); what is queued meanwhile waits in tail, and follows it */
	pull_share	  *share;
	size_t		   share_off;
	uint8_t		  *tail;
	size_t		   taillen;
	srv_job		   job;
	struct client *done_next; /* inbox */
} client;

static client		  *clients; /* ws thread only */
static client		  *pending; /* under pending_mu */
static pthread_mutex_t pending_mu = PTHREAD_MUTEX_INITIALIZER;
static client		  *inbox; /* under inbox_mu: subscriptions whose pull is done */
static pthread_mutex_t inbox_mu = PTHREAD_MUTEX_INITIALIZER;
static atomic_bool	   announced; /* some ws_version moved: tick at once */
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
	atomic_store(&announced, true);
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

/* pending_out: c has bytes to send. */
static bool
pending_out(const client *c)
{
	return c->outlen || c->share || c->taillen;
}

/* discard_out: the peer is gone or not reading: nothing more is sent. */
static void
discard_out(client *c)
{
	c->outlen = c->taillen = 0;
	pull_share_unref(c->share);
	c->share = NULL;
	c->share_off = 0;
}

/* frame_header writes the header of a server frame (never masked) of n bytes. */
static size_t
frame_header(uint8_t hdr[10], int opcode, size_t n)
{
	hdr[0] = (uint8_t) (0x80 | opcode);
	if (n < 126)
	{
		hdr[1] = (uint8_t) n;
		return 2;
	}
	if (n <= 0xffff)
	{
		hdr[1] = 126;
		hdr[2] = (uint8_t) (n >> 8);
		hdr[3] = (uint8_t) n;
		return 4;
	}
	hdr[1] = 127;
	for (int i = 0; i < 8; i++)
		hdr[2 + i] = (uint8_t) ((uint64_t) n >> (56 - 8 * i));
	return 10;
}

/*
 * append adds a header and its data to c's output: to out, or behind the
 * payload being sent (tail). Either holds at most OUT_MAX bytes: a client
 * whose output would exceed that is not reading, and is let go.
 */
static void
append(client *c, const uint8_t *hdr, size_t h, const void *data, size_t n)
{
	uint8_t **buf = c->share ? &c->tail : &c->out;
	size_t	 *len = c->share ? &c->taillen : &c->outlen;
	uint8_t	 *o;

	if (*len + h + n > OUT_MAX || !(o = realloc(*buf, *len + h + n)))
	{
		c->closing = true;
		discard_out(c);
		return;
	}
	*buf = o;
	memcpy(o + *len, hdr, h);
	if (n)
		memcpy(o + *len + h, data, n);
	*len += h + n;
}

/* queue appends one frame. */
static void
queue(client *c, int opcode, const void *data, size_t n)
{
	uint8_t hdr[10];

	if (c->closing && opcode != 0x8)
		return;
	append(c, hdr, frame_header(hdr, opcode, n), data, n);
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

/* ---- subscriptions -------------------------------------------------------- */

static void drop(client *c);
static bool flush(client *c);

static srv_job *to_submit[SRV_MAX_DBS]; /* ws thread: jobs to queue at the end of the round */

/* queue_json sends one JSON message (cJSON escapes what the strings hold). */
static void
queue_json(client *c, cJSON *m)
{
	char *text = cJSON_PrintUnformatted(m);

	cJSON_Delete(m);
	if (!text)
	{
		queue_close(c, 1011, "out of memory");
		return;
	}
	queue(c, 0x1, text, strlen(text));
	cJSON_free(text);
}

static void
queue_type(client *c, const char *type)
{
	cJSON *m = cJSON_CreateObject();

	cJSON_AddStringToObject(m, "type", type);
	queue_json(c, m);
}

/* queue_error: {"type":"error", status, error, detail, hint}, as HTTP errors are. */
static void
queue_error(client *c, const srv_error *e)
{
	cJSON *m = cJSON_CreateObject();

	cJSON_AddStringToObject(m, "type", "error");
	cJSON_AddNumberToObject(m, "status", e->status);
	cJSON_AddStringToObject(m, "error", e->error);
	cJSON_AddStringToObject(m, "detail", e->detail);
	cJSON_AddStringToObject(m, "hint", e->hint);
	if (e->retry_after > 0) /* HTTP's Retry-After */
		cJSON_AddNumberToObject(m, "retry_after", e->retry_after);
	queue_json(c, m);
}

/* set_cursor: the subscription goes on from a chunk's cursor text; false if it is not one. */
static bool
set_cursor(client *c, const char *text)
{
	pgs_cursor cur;
	uint8_t	  *buf = c->sealed ? c->sealed : malloc(PGS_MAX_SEALED);

	if (!buf)
		return false;
	c->sealed = buf;
	if (!pgs_cursor_parse(text, &cur, buf))
		return false;
	c->since = cur.since;
	c->gen = cur.gen;
	c->sealed_len = cur.sealed ? cur.sealed_len : 0;
	return true;
}

static void
on_job_done(srv_job *j) /* a worker, or whoever failed the job */
{
	client *c = (client *) (void *) ((char *) j - offsetof(client, job));

	pthread_mutex_lock(&inbox_mu);
	c->done_next = inbox;
	inbox = c;
	pthread_mutex_unlock(&inbox_mu);
	kick();
}

/*
 * maybe_pull queues c's next pull when it has one to make and the last
 * payload has left (the socket took it): a client that does not read is not
 * sent more than one payload ahead, and is disconnected by queue's cap.
 */
static void
maybe_pull(client *c, int64_t now)
{
	srv_job *j = &c->job;
	uint8_t *sealed = NULL;

	if (!c->subscribed || !c->want_pull || c->inflight || c->closing || pending_out(c) ||
		now < c->retry_at)
		return;
	if (c->sealed_len && !(sealed = malloc(c->sealed_len)))
	{
		c->retry_at = now + 1000;
		return;
	}
	memset(j, 0, sizeof *j);
	j->kind = JOB_PULL;
	j->db = c->db;
	j->auth = &c->auth;
	j->since = c->since;
	j->gen = c->gen;
	if (sealed) /* the job's own copy: a subscribe may change c's while it runs */
	{
		memcpy(sealed, c->sealed, c->sealed_len);
		j->sealed = sealed;
		j->sealed_len = c->sealed_len;
	}
	j->max_rows = c->max_rows ? c->max_rows : sealed ? SRV_CHUNK_ROWS_DEFAULT : 0;
	memcpy(c->job_exclude, c->exclude, sizeof c->exclude); /* the job's own, as sealed */
	j->exclude = c->job_exclude[0] ? c->job_exclude : NULL;
	j->on_done = on_job_done;
	c->want_pull = false;
	c->inflight = true;
	c->job_epoch = c->epoch;
	c->last_pull = now;
	j->next = to_submit[c->db->index];
	to_submit[c->db->index] = j;
}

/* submit_all queues the round's pulls, each database's under one lock (work.c
 * then answers those with the same view together). */
static void
submit_all(void)
{
	for (int i = 0; i < cfg.ndbs; i++)
		if (to_submit[i])
		{
			srv_job *list = to_submit[i];

			to_submit[i] = NULL;
			work_requeue_list(&cfg.dbs[i], list);
		}
}

static void
free_client(client *c)
{
	auth_free(&c->auth);
	pull_share_unref(c->share);
	free(c->sealed);
	free(c->in);
	free(c->out);
	free(c->tail);
	free(c);
}

/*
 * send_payload: {"type":"payload", cursor, more, bytes[, rows_total]}, then
 * the payload as one binary frame, sent from p itself (the reference passes
 * to c).
 */
static bool
send_payload(client *c, pull_share *p)
{
	uint8_t hdr[10];
	cJSON  *m;
	pgs_buf text;
	char   *cursor;
	bool	ok;

	if (c->closing) /* going: nothing more is sent */
	{
		pull_share_unref(p);
		return true;
	}
	m = cJSON_CreateObject();
	pgs_buf_init(&text);
	if (!p->more)
		pgs_cursor_format(&text, p->cursor, p->gen, NULL, 0);
	cursor = p->more ? p->more : text.p ? (char *) text.p : "0";
	cJSON_AddStringToObject(m, "type", "payload");
	cJSON_AddStringToObject(m, "cursor", cursor);
	cJSON_AddBoolToObject(m, "more", p->more != NULL);
	cJSON_AddNumberToObject(m, "bytes", (double) p->len);
	if (p->rows_total >= 0)
		cJSON_AddNumberToObject(m, "rows_total", (double) p->rows_total);
	queue_json(c, m);
	append(c, hdr, frame_header(hdr, 0x2, p->len), NULL, 0);
	metrics_bytes(c->db, 0, p->len);
	metrics_ws_payload(c->db);
	if (p->more) /* a chunk: its cursor carries the sealed part */
		ok = set_cursor(c, p->more);
	else
	{
		c->since = p->cursor;
		c->gen = p->gen;
		c->sealed_len = 0;
		ok = true;
	}
	pgs_buf_free(&text);
	if (c->closing)
		pull_share_unref(p);
	else
		c->share = p;
	return ok;
}

/* on_result: c's pull came back (ws thread). */
static void
on_result(client *c, int64_t now)
{
	srv_job	   *j = &c->job;
	pull_share *p = j->pull;

	j->pull = NULL;
	free((void *) j->sealed);
	j->sealed = NULL;
	c->inflight = false;
	if (c->zombie)
	{
		pull_share_unref(p);
		free_client(c);
		return;
	}
	if (!c->subscribed || c->job_epoch != c->epoch)
		; /* unsubscribed or subscribed anew meanwhile: the answer is not for it */
	else if (j->failed && j->e.status == 503)
	{
		c->want_pull = true; /* busy or stopping: the same pull a second later */
		c->retry_at = now + 1000;
	}
	else if (j->failed)
	{
		queue_error(c, &j->e);
		c->subscribed = false;
	}
	else if (p)
	{
		bool more = p->more != NULL;

		if (!send_payload(c, p))
			queue_close(c, 1011, "internal error");
		else if (more)
			c->want_pull = true; /* the next chunk */
		p = NULL;				 /* c sends it, and lets it go */
	}
	else
	{
		c->since = j->since; /* nothing new: the cursor may still move (its generation) */
		c->gen = j->gen;
		c->sealed_len = 0;
	}
	pull_share_unref(p);
	if (!flush(c) || (c->closing && !pending_out(c)))
		drop(c);
	else
		maybe_pull(c, now);
}

static void
take_inbox(int64_t now)
{
	client *list;

	pthread_mutex_lock(&inbox_mu);
	list = inbox;
	inbox = NULL;
	pthread_mutex_unlock(&inbox_mu);
	while (list)
	{
		client *c = list;

		list = c->done_next;
		c->done_next = NULL;
		on_result(c, now);
	}
}

#define SUBSCRIBE_HINT                                                                             \
	"Send {\"type\":\"subscribe\",\"since\":CURSOR,\"exclude\":SITE} or "                          \
	"{\"type\":\"unsubscribe\"} (docs/PROTOCOL.md, \"Payloads over the WebSocket\")."

/* subscribe reads {"type":"subscribe", since, exclude, max_rows}; false with e if it is wrong. */
static bool
subscribe(client *c, const cJSON *m, srv_error *e)
{
	const cJSON *since = cJSON_GetObjectItemCaseSensitive(m, "since");
	const cJSON *excl = cJSON_GetObjectItemCaseSensitive(m, "exclude");
	const cJSON *mr = cJSON_GetObjectItemCaseSensitive(m, "max_rows");
	uint8_t		 uuid[16];
	pgs_cursor	 cur = {0};
	uint8_t		*buf = NULL;

	if (mr && !cJSON_IsNull(mr) &&
		(!cJSON_IsNumber(mr) || mr->valuedouble < 1 || mr->valuedouble > SRV_MAX_ROWS ||
		 mr->valuedouble != (double) (int64_t) mr->valuedouble))
		return srv_fail(e, 400, "bad max_rows", "Pass a number of rows from 1 to 10000000.",
						"\"max_rows\" is not a row count.");
	if (excl && !cJSON_IsNull(excl) &&
		(!cJSON_IsString(excl) ||
		 !pgs_uuid_parse(excl->valuestring, strlen(excl->valuestring), uuid)))
		return srv_fail(e, 400, "bad site id", "Pass the client's sync_site_id().",
						"\"exclude\" is not a UUID.");
	if (since && !cJSON_IsNull(since) && !(cJSON_IsNumber(since) && since->valuedouble == 0))
	{
		if (!cJSON_IsString(since) || !(buf = malloc(PGS_MAX_SEALED)) ||
			!pgs_cursor_parse(since->valuestring, &cur, buf))
		{
			free(buf);
			return srv_fail(e, 400, "bad cursor",
							"Pass the cursor of the last payload (or of the last pull), or 0.",
							"\"since\": %.64s is not a cursor this server handed out.",
							cJSON_IsString(since) ? since->valuestring : "(not a string)");
		}
	}
	if (cur.sealed)
	{
		free(c->sealed);
		c->sealed = buf;
		c->sealed_len = cur.sealed_len;
	}
	else
	{
		free(buf);
		c->sealed_len = 0;
	}
	c->since = cur.since;
	c->gen = cur.gen;
	c->max_rows =
		mr && cJSON_IsNumber(mr) ? (uint32_t) mr->valuedouble : (uint32_t) c->db->c.pull_max_rows;
	if (excl && cJSON_IsString(excl))
		snprintf(c->exclude, sizeof c->exclude, "%s", excl->valuestring);
	else
		c->exclude[0] = '\0';
	c->subscribed = true;
	c->epoch++;
	c->want_pull = true; /* catch up at once */
	c->retry_at = 0;
	c->sent = atomic_load(&c->db->ws_version);
	queue_type(c, "subscribed");
	return true;
}

/* on_message: a client's text or binary message, whole. */
static void
on_message(client *c, const uint8_t *data, size_t len)
{
	cJSON		*m = cJSON_ParseWithLength((const char *) data, len);
	const cJSON *type = cJSON_GetObjectItemCaseSensitive(m, "type");
	srv_error	 e;

	if (!cJSON_IsObject(m) || !cJSON_IsString(type))
		srv_fail(&e, 400, "bad message", SUBSCRIBE_HINT,
				 "A message is one JSON object with a \"type\"; these %zu bytes are not.", len);
	else if (strcmp(type->valuestring, "subscribe") == 0)
	{
		int retry = 0;

		/* a subscribe costs a pull at once: it takes from the token's bucket
		 * like a request (a socket that re-subscribes in a loop is limited
		 * as the same client pulling in a loop would be) */
		if (!ratelimit_take(c->db, c->auth.subject, &retry))
		{
			metrics_rate_limited(c->db);
			srv_fail(&e, 429, "rate limit exceeded",
					 "Wait retry_after seconds, then subscribe again; a subscription that stands "
					 "needs no new subscribe.",
					 "This client may make %g requests per second (burst %d); the subscription "
					 "is unchanged.",
					 c->db->c.rate_limit, c->db->c.rate_burst);
			e.retry_after = retry;
		}
		else if (subscribe(c, m, &e))
		{
			cJSON_Delete(m);
			return;
		}
	}
	else if (strcmp(type->valuestring, "unsubscribe") == 0)
	{
		c->subscribed = false;
		c->want_pull = false;
		c->epoch++;
		cJSON_Delete(m);
		queue_type(c, "unsubscribed");
		return;
	}
	else
		srv_fail(&e, 400, "unknown message type", SUBSCRIBE_HINT,
				 "\"type\": \"%.40s\" is not a message this server knows.", type->valuestring);
	cJSON_Delete(m);
	queue_error(c, &e);
}

/* flush writes what the socket takes; false when the peer is gone. */
static bool
flush(client *c)
{
	bool blocked = false;

	while (!blocked && (c->outlen || c->share))
	{
		const uint8_t *p = c->outlen ? c->out : c->share->payload + c->share_off;
		size_t		   left = c->outlen ? c->outlen : c->share->len - c->share_off, done = 0;

		while (done < left)
		{
			ssize_t n = send(c->fd, p + done, left - done, MSG_NOSIGNAL | MSG_DONTWAIT);

			if (n < 0)
			{
				if (errno == EAGAIN || errno == EWOULDBLOCK)
				{
					blocked = true;
					break;
				}
				if (errno == EINTR)
					continue;
				return false;
			}
			done += (size_t) n;
		}
		if (c->outlen) /* once per round: a payload leaves in many sends */
		{
			memmove(c->out, c->out + done, c->outlen - done);
			c->outlen -= done;
		}
		else if ((c->share_off += done) == c->share->len)
		{
			uint8_t *o = c->out; /* the payload is out: what waited behind it is next */

			pull_share_unref(c->share);
			c->share = NULL;
			c->share_off = 0;
			c->out = c->tail;
			c->outlen = c->taillen;
			c->tail = o;
			c->taillen = 0;
		}
	}
	if (pending_out(c) != c->want_out)
	{
		struct epoll_event ev = {.events = EPOLLIN | (pending_out(c) ? EPOLLOUT : 0),
								 .data.ptr = c};

		c->want_out = pending_out(c);
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
			case 0x1:
			case 0x2:
				if (fin)
					on_message(c, p + h + 4, (size_t) len);
				else
				{
					srv_error e;

					srv_fail(&e, 400, "fragmented message", SUBSCRIBE_HINT,
							 "Messages to this server fit in one frame; this one was fragmented.");
					queue_error(c, &e);
				}
				break;
			case 0x0:
			case 0xA:
				break; /* the rest of a fragmented message (answered above), pongs */
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
	if (c->inflight)
	{
		c->zombie = true; /* its job points into it: on_result frees it */
		discard_out(c);
		free(c->in);
		free(c->out);
		free(c->tail);
		c->in = c->out = c->tail = NULL;
		return;
	}
	free_client(c);
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
		if (!flush(c) || (c->closing && !pending_out(c)))
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
			discard_out(c);
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
		else if (c->auth.exp && wall > c->auth.exp + cfg.jwt_leeway)
			queue_close(c, 4001, "token expired");
		else if (now - c->last_rx > 3000LL * cfg.ws_ping_s)
		{
			c->closing = true; /* silent for 3 ping periods: gone */
			discard_out(c);
		}
		else
		{
			if (v > c->sent && c->subscribed)
			{
				c->sent = v; /* subscribers get the payload instead */
				c->want_pull = true;
			}
			else if (c->subscribed && now - c->last_pull >= 1000LL * cfg.ws_ping_s)
				c->want_pull = true; /* what the token may see can change without a
										write (a role membership): a pull notices,
										as a long-poll's does when its wait ends */
			else if (v > c->sent)
				queue_version(c, "changes", v);
			if (now - c->last_ping >= 1000LL * cfg.ws_ping_s)
			{
				queue(c, 0x9, "", 0);
				c->last_ping = now;
			}
		}
		if (!flush(c) || (c->closing && !pending_out(c)))
			drop(c);
		else
			maybe_pull(c, now);
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
			if (!flush(c) || (c->closing && !pending_out(c)))
				drop(c);
			else
				maybe_pull(c, now);
		}
		if (announce)
		{
			adopt_pending();
			take_inbox(now);
		}
		if (atomic_exchange(&announced, false) || now - last_tick >= 1000)
		{
			tick(now, false);
			last_tick = now;
		}
		submit_all();
	}
	adopt_pending();
	tick(srv_now_ms(), true);
	while (clients)
		drop(clients); /* best effort: close frames were queued */
	submit_all();	   /* the workers are stopping: these come back at once */
	take_inbox(srv_now_ms());
	return NULL;
}

/* ---- upgrade (libmicrohttpd threads) -------------------------------------- */

static void
on_upgrade(void *cls, struct MHD_Connection *conn, void *req_cls, const char *extra_in,
		   size_t extra_in_size, MHD_socket sock, struct MHD_UpgradeResponseHandle *urh)
{
	client			*c = calloc(1, sizeof *c);
	int				 fl;
	const ws_ticket *t = cls;
	bool			 auth_ok = c && auth_copy(&c->auth, t->auth);

	(void) conn, (void) req_cls;
	if (c && extra_in_size && extra_in_size <= IN_MAX && (c->in = malloc(extra_in_size)) != NULL)
		c->incap = extra_in_size;
	if (!c || !auth_ok || (extra_in_size && !c->in) || atomic_load(&stop_flag))
	{
		if (c)
		{
			if (auth_ok)
				auth_free(&c->auth);
			free(c->in);
		}
		free(c);
		MHD_upgrade_action(urh, MHD_UPGRADE_ACTION_CLOSE);
		return;
	}
	fl = fcntl(sock, F_GETFL);
	fcntl(sock, F_SETFL, fl | O_NONBLOCK);
	c->fd = sock;
	c->urh = urh;
	c->db = t->db;
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
ws_upgrade(struct MHD_Connection *conn, const ws_ticket *t, struct MHD_Response **resp,
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
	*resp = MHD_create_response_for_upgrade(on_upgrade, (void *) t);
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
		free_client(c);
	}
	pthread_mutex_unlock(&pending_mu);
	take_inbox(srv_now_ms()); /* a job that came back after the thread ended */
	close(epfd);
	close(evfd);
	epfd = evfd = -1;
	started = false;
}
