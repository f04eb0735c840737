/*
 * tls.c — HTTPS for pgsync-server through libmicrohttpd's own TLS (GnuTLS).
 *
 * tls_cert and tls_key name PEM files (the certificate may be followed by
 * its intermediate chain). Both are read once at start and checked here
 * with GnuTLS, so that a wrong path, a key that does not belong to the
 * certificate or an encrypted key stop the server (and --check-config) with
 * a message that names the file, instead of libmicrohttpd's generic "cannot
 * start". The PEM texts then stay in memory for the daemon's lifetime
 * (libmicrohttpd keeps pointers to them) and the key is wiped at exit.
 *
 * Protocol versions: TLS 1.2 and 1.3 only (TLS_PRIORITIES), GnuTLS's
 * NORMAL cipher suites otherwise. Certificates are not reloaded: after a
 * renewal, restart the process (processes are stateless; clients retry).
 * Without tls_cert the server speaks plain HTTP, for deployments behind a
 * TLS-terminating proxy.
 */
#include "server.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <microhttpd.h>

#define TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

static char					*cert_pem;
static char					*key_pem;
static size_t				 key_len;
static char					 summary[512];
static struct MHD_OptionItem options[4] = {{MHD_OPTION_END, 0, NULL}};

bool
tls_enabled(void)
{
	return cert_pem != NULL;
}

const struct MHD_OptionItem *
tls_mhd_options(void)
{
	return options;
}

const char *
tls_summary(void)
{
	return summary;
}

void
tls_free(void)
{
	if (key_pem)
		explicit_bzero(key_pem, key_len);
	free(key_pem);
	free(cert_pem);
	key_pem = cert_pem = NULL;
	key_len = 0;
	summary[0] = '\0';
	options[0].option = MHD_OPTION_END;
}

static void
format_time(time_t t, char *out, size_t n)
{
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(out, n, "%Y-%m-%d %H:%M UTC", &tm);
}

/* describe fills summary from the first certificate; warns about its dates. */
static bool
describe(const srv_config *c, const gnutls_datum_t *cert)
{
	gnutls_x509_crt_t crt;
	gnutls_datum_t	  dn = {NULL, 0};
	time_t			  from, until, now = time(NULL);
	char			  f[32], u[32];
	int				  rc;

	if (gnutls_x509_crt_init(&crt) < 0)
		return false;
	rc = gnutls_x509_crt_import(crt, cert, GNUTLS_X509_FMT_PEM);
	if (rc < 0)
	{
		fprintf(stderr, SRV_NAME ": tls_cert \"%s\" holds no PEM certificate: %s\n", c->tls_cert,
				gnutls_strerror(rc));
		gnutls_x509_crt_deinit(crt);
		return false;
	}
	from = gnutls_x509_crt_get_activation_time(crt);
	until = gnutls_x509_crt_get_expiration_time(crt);
	format_time(from, f, sizeof f);
	format_time(until, u, sizeof u);
	if (gnutls_x509_crt_get_dn3(crt, &dn, 0) < 0)
		dn.data = NULL;
	snprintf(summary, sizeof summary, "TLS 1.2+, certificate \"%s\" valid from %s until %s",
			 dn.data ? (const char *) dn.data : "?", f, u);
	gnutls_free(dn.data);
	gnutls_x509_crt_deinit(crt);
	if (until != (time_t) -1 && until < now)
		srv_log(
			"WARNING",
			"tls_cert \"%s\" expired on %s: clients will refuse to connect; renew it and restart",
			c->tls_cert, u);
	else if (until != (time_t) -1 && until < now + 14 * 86400)
		srv_log("WARNING", "tls_cert \"%s\" expires on %s: renew it and restart", c->tls_cert, u);
	if (from != (time_t) -1 && from > now)
		srv_log("WARNING", "tls_cert \"%s\" is not valid before %s: check the clock", c->tls_cert,
				f);
	return true;
}

bool
tls_load(const srv_config *c)
{
	gnutls_certificate_credentials_t cred;
	gnutls_priority_t				 prio;
	gnutls_datum_t					 cd, kd;
	const char						*bad;
	char							 why[256];
	struct stat						 st;
	int								 rc;

	tls_free();
	if (!c->tls_cert && !c->tls_key)
		return true;
	if (!c->tls_cert || !c->tls_key)
	{
		fprintf(stderr,
				SRV_NAME
				": %s is set (from %s) but %s is not\n"
				"HINT: Set both tls_cert and tls_key for HTTPS, or neither for plain HTTP.\n",
				c->tls_cert ? "tls_cert" : "tls_key",
				config_source(c->tls_cert ? "tls_cert" : "tls_key"),
				c->tls_cert ? "tls_key" : "tls_cert");
		return false;
	}
	if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
	{
		fprintf(stderr, SRV_NAME ": this libmicrohttpd was built without TLS support\n"
								 "HINT: Install a libmicrohttpd built with GnuTLS, or remove "
								 "tls_cert and tls_key and terminate TLS at a proxy.\n");
		return false;
	}
	if (!(cert_pem = srv_read_file(c->tls_cert, why, sizeof why)))
	{
		fprintf(stderr, SRV_NAME ": could not read tls_cert \"%s\": %s\n", c->tls_cert, why);
		return false;
	}
	if (!(key_pem = srv_read_file(c->tls_key, why, sizeof why)))
	{
		fprintf(stderr, SRV_NAME ": could not read tls_key \"%s\": %s\n", c->tls_key, why);
		tls_free();
		return false;
	}
	key_len = strlen(key_pem);
	if (stat(c->tls_key, &st) == 0 && (st.st_mode & S_IROTH))
		srv_log("WARNING", "tls_key \"%s\" is readable by every user: chmod o-r it", c->tls_key);

	cd.data = (unsigned char *) cert_pem;
	cd.size = (unsigned) strlen(cert_pem);
	kd.data = (unsigned char *) key_pem;
	kd.size = (unsigned) key_len;
	if (!describe(c, &cd))
	{
		tls_free();
		return false;
	}
	if (gnutls_certificate_allocate_credentials(&cred) < 0)
	{
		fprintf(stderr, SRV_NAME ": out of memory\n");
		tls_free();
		return false;
	}
	rc = gnutls_certificate_set_x509_key_mem2(cred, &cd, &kd, GNUTLS_X509_FMT_PEM, NULL, 0);
	gnutls_certificate_free_credentials(cred);
	if (rc < 0)
	{
		if (rc == GNUTLS_E_CERTIFICATE_KEY_MISMATCH)
			fprintf(stderr,
					SRV_NAME ": tls_key \"%s\" is not the private key of tls_cert \"%s\"\n"
							 "HINT: Use the key the certificate was issued for.\n",
					c->tls_key, c->tls_cert);
		else
			fprintf(stderr,
					SRV_NAME ": tls_cert \"%s\" and tls_key \"%s\" cannot be used: %s\n"
							 "HINT: Both must be PEM files, the key unencrypted "
							 "(openssl pkey -in key.pem -out plain.pem).\n",
					c->tls_cert, c->tls_key, gnutls_strerror(rc));
		tls_free();
		return false;
	}
	rc = gnutls_priority_init(&prio, TLS_PRIORITIES, &bad);
	if (rc < 0)
	{
		fprintf(stderr, SRV_NAME ": GnuTLS refuses the priority string at \"%s\": %s\n", bad,
				gnutls_strerror(rc));
		tls_free();
		return false;
	}
	gnutls_priority_deinit(prio);

	options[0] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, cert_pem};
	options[1] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, key_pem};
	options[2] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_PRIORITIES, 0, (void *) TLS_PRIORITIES};
	options[3] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
	return true;
}
