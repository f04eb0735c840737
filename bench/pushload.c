/*
 * pushload — the load generator of the server bench's pushraw phase:
 * N clients, one thread and one keep-alive connection (libcurl easy handle)
 * each, POST their payloads to /v1/push one after the other.
 *
 *     pushload URL DIR N
 *
 * DIR/c<i> (i = 0 .. N-1) holds client i's bearer token on its first line,
 * then its payloads, each as a 4-byte big-endian length and the bytes.
 * Every thread reads its file first; then all start together. Prints
 * "pushes errors seconds" (errors: transport failures and answers other
 * than 200) and exits 0, or 1 when it could not run at all. The first few
 * failures are described on stderr (curl's error or the status and the
 * start of the answer), so that an error in the bench has a cause.
 *
 * Why C: a Python client with 50 threads took about a core of a 2-core
 * machine and its GIL, so the bench measured the client as much as the
 * server and Postgres (bench/server_bench.py, phase_push_raw).
 */
#include <curl/curl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct client
{
	const char *url;
	char		path[4096];
	char	   *data;  /* the file */
	size_t		size;  /* its length */
	size_t		first; /* offset of the first payload */
	long		pushes, errors;
	int			failed;		 /* could not read the file or set up curl */
	char		answer[256]; /* the start of the current answer */
	size_t		answer_len;
} client;

static pthread_barrier_t start;
static pthread_mutex_t	 told_lock = PTHREAD_MUTEX_INITIALIZER;
static int				 told; /* failures described so far */

static size_t
keep_start(char *p, size_t size, size_t n, void *arg)
{
	client *c = arg;
	size_t	room = sizeof c->answer - 1 - c->answer_len;
	size_t	take = size * n < room ? size * n : room;

	memcpy(c->answer + c->answer_len, p, take);
	c->answer_len += take;
	return size * n;
}

/* Describes one failed push on stderr, the first 5 of the whole run only. */
static void
tell(client *c, CURLcode rc, long status)
{
	pthread_mutex_lock(&told_lock);
	if (told++ < 5)
	{
		c->answer[c->answer_len] = '\0';
		if (rc != CURLE_OK)
			fprintf(stderr, "pushload: push failed: %s\n", curl_easy_strerror(rc));
		else
			fprintf(stderr, "pushload: push answered %ld: %.200s\n", status, c->answer);
	}
	pthread_mutex_unlock(&told_lock);
}

static int
load(client *c)
{
	FILE *f = fopen(c->path, "rb");
	char *nl;

	if (!f)
		return -1;
	fseek(f, 0, SEEK_END);
	c->size = (size_t) ftell(f);
	rewind(f);
	c->data = malloc(c->size + 1);
	if (!c->data || fread(c->data, 1, c->size, f) != c->size)
	{
		fclose(f);
		return -1;
	}
	fclose(f);
	c->data[c->size] = '\0';
	nl = memchr(c->data, '\n', c->size);
	if (!nl)
		return -1;
	*nl = '\0';
	c->first = (size_t) (nl - c->data) + 1;
	return 0;
}

static void *
run(void *arg)
{
	client			  *c = arg;
	CURL			  *h = NULL;
	struct curl_slist *hdr = NULL;
	char			   auth[8192];
	size_t			   at;

	if (load(c) == 0 && (h = curl_easy_init()) != NULL)
	{
		snprintf(auth, sizeof auth, "Authorization: Bearer %s", c->data);
		hdr = curl_slist_append(hdr, auth);
		hdr = curl_slist_append(hdr, "Content-Type: application/octet-stream");
		hdr = curl_slist_append(hdr, "Expect:"); /* no 100-continue round trip */
		curl_easy_setopt(h, CURLOPT_URL, c->url);
		curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdr);
		curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, keep_start);
		curl_easy_setopt(h, CURLOPT_WRITEDATA, c);
		curl_easy_setopt(h, CURLOPT_TIMEOUT, 30L);
		curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
	}
	else
		c->failed = 1;
	pthread_barrier_wait(&start);
	for (at = c->first; !c->failed && at + 4 <= c->size;)
	{
		const uint8_t *p = (const uint8_t *) c->data + at;
		size_t		   len = (size_t) p[0] << 24 | (size_t) p[1] << 16 | (size_t) p[2] << 8 | p[3];
		long		   status = 0;
		CURLcode	   rc;

		if (at + 4 + len > c->size)
		{
			c->failed = 1;
			break;
		}
		curl_easy_setopt(h, CURLOPT_POSTFIELDS, c->data + at + 4);
		curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE, (long) len);
		c->answer_len = 0;
		rc = curl_easy_perform(h);
		if (rc == CURLE_OK)
			rc = curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
		if (rc != CURLE_OK || status != 200)
		{
			c->errors++;
			tell(c, rc, status);
		}
		c->pushes++;
		at += 4 + len;
	}
	curl_slist_free_all(hdr);
	if (h)
		curl_easy_cleanup(h);
	free(c->data);
	return NULL;
}

int
main(int argc, char **argv)
{
	struct timespec t0, t1;
	client		   *cs;
	pthread_t	   *ts;
	long			pushes = 0, errors = 0;
	int				n, failed = 0;

	if (argc != 4 || (n = atoi(argv[3])) <= 0)
	{
		fprintf(stderr, "usage: pushload URL DIR N\n");
		return 1;
	}
	curl_global_init(CURL_GLOBAL_DEFAULT);
	cs = calloc((size_t) n, sizeof *cs);
	ts = calloc((size_t) n, sizeof *ts);
	if (!cs || !ts)
		return 1;
	pthread_barrier_init(&start, NULL, (unsigned) n + 1);
	for (int i = 0; i < n; i++)
	{
		cs[i].url = argv[1];
		snprintf(cs[i].path, sizeof cs[i].path, "%s/c%d", argv[2], i);
		if (pthread_create(&ts[i], NULL, run, &cs[i]) != 0)
			return 1;
	}
	pthread_barrier_wait(&start);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < n; i++)
	{
		pthread_join(ts[i], NULL);
		pushes += cs[i].pushes;
		errors += cs[i].errors;
		failed |= cs[i].failed;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (failed)
	{
		fprintf(stderr, "pushload: a client could not read its file or set up curl\n");
		return 1;
	}
	printf("%ld %ld %.6f\n", pushes, errors,
		   (double) (t1.tv_sec - t0.tv_sec) + (double) (t1.tv_nsec - t0.tv_nsec) / 1e9);
	free(cs);
	free(ts);
	curl_global_cleanup();
	return 0;
}
