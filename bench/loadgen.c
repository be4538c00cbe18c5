/* Load generator and UDP responder for the data-plane benchmark (bench/dataplane.py).
 *
 *   loadgen crr IP[,IP...] PORT SECONDS CONCURRENCY
 *                                             new TCP connection per HTTP request
 *   loadgen rr  IP[,IP...] PORT SECONDS CONCURRENCY
 *                                             HTTP requests on established connections
 *   loadgen udp IP[,IP...] PORT SECONDS CONCURRENCY
 *                                             UDP request/reply, one datagram in flight
 *                                             per socket (each socket its own flow)
 *   loadgen udp-server IP PORT TAG            answer every datagram with TAG
 *
 * Clients are one thread with epoll, CONCURRENCY operations in flight, and print
 * one JSON object: completed operations, errors, stalls (operations slower than
 * 200 ms, TCP's least retransmission timeout: something was lost and sent again;
 * operations still in flight at the end count with their time so far), the
 * rate, p50/p99 of the connect
 * time (crr: connect() until the socket is writable, i.e. the SYN/SYN-ACK round
 * trip through the load balancer) and of the whole operation, and how many replies
 * each responder gave (the HTTP body or the UDP reply is the responder's tag), so
 * the caller can check every backend was reached.  Several addresses are taken in
 * turn (client-side balancing: the no-load-balancer baseline).  In crr the client closes first,
 * after the full response, as HTTP clients do; the client's namespace should set
 * net.ipv4.tcp_tw_reuse=1 so its ports come back.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONC 1024
#define MAX_TAGS 16
#define MAX_DSTS 16
#define OP_TIMEOUT_NS 2000000000ULL
#define UDP_TIMEOUT_NS 200000000ULL
#define STALL_NS 200000000ULL /* TCP's least retransmission timeout: slower means a loss */

static const char REQUEST[] = "GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

struct samples {
	uint64_t *v;
	size_t n, cap;
};

struct conn {
	int fd;
	int connected;
	uint64_t started;	/* this operation (crr: the connect) began */
	uint64_t op_started;	/* this request began */
	char buf[2048];
	size_t len;
};

static struct samples connect_ns, op_ns;
static char tags[MAX_TAGS][64];
static uint64_t tag_count[MAX_TAGS];
static uint64_t ok, errors, stalls;
static int epfd;
static struct sockaddr_in dsts[MAX_DSTS];
static int ndsts, next_dst;
#define dst dsts[0]

static const struct sockaddr_in *pick_dst(void)
{
	const struct sockaddr_in *d = &dsts[next_dst];
	next_dst = (next_dst + 1) % ndsts;
	return d;
}

static uint64_t now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void add(struct samples *s, uint64_t v)
{
	if (s->n == s->cap) {
		s->cap = s->cap ? s->cap * 2 : 65536;
		s->v = realloc(s->v, s->cap * sizeof(*s->v));
		if (!s->v)
			die("realloc");
	}
	s->v[s->n++] = v;
}

/* An operation's time; a stall (a lost packet waited for) is counted too. */
static void add_op(uint64_t v)
{
	if (v > STALL_NS)
		stalls++;
	add(&op_ns, v);
}

static int cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static double pct(struct samples *s, double p)
{
	if (!s->n)
		return -1;
	size_t i = (size_t)(p * (double)(s->n - 1) + 0.5);
	return (double)s->v[i] / 1000.0;
}

static void count_tag(const char *tag, size_t len)
{
	while (len && (tag[len - 1] == '\n' || tag[len - 1] == '\r'))
		len--;
	if (len >= sizeof(tags[0]))
		len = sizeof(tags[0]) - 1;
	for (int i = 0; i < MAX_TAGS; i++) {
		if (!tags[i][0]) {
			memcpy(tags[i], tag, len);
			tags[i][len] = 0;
		}
		if (strlen(tags[i]) == len && !memcmp(tags[i], tag, len)) {
			tag_count[i]++;
			return;
		}
	}
}

static int tcp_open(struct conn *c)
{
	c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (c->fd < 0)
		die("socket");
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	c->connected = 0;
	c->len = 0;
	c->started = now();
	const struct sockaddr_in *d = pick_dst();
	if (connect(c->fd, (const struct sockaddr *)d, sizeof(*d)) < 0 && errno != EINPROGRESS)
		return -1;
	struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
		die("epoll_ctl");
	return 0;
}

static void tcp_close(struct conn *c)
{
	close(c->fd); /* also leaves the epoll set */
	c->fd = -1;
}

static int tcp_send(struct conn *c)
{
	c->op_started = now();
	c->len = 0;
	return send(c->fd, REQUEST, sizeof(REQUEST) - 1, MSG_NOSIGNAL) == sizeof(REQUEST) - 1 ? 0 : -1;
}

/* 1: a whole response is in the buffer (counted), 0: need more, -1: broken. */
static int tcp_response(struct conn *c)
{
	ssize_t n = recv(c->fd, c->buf + c->len, sizeof(c->buf) - 1 - c->len, 0);
	if (n <= 0)
		return n == 0 || (errno != EAGAIN && errno != EINTR) ? -1 : 0;
	c->len += (size_t)n;
	c->buf[c->len] = 0;
	char *end = strstr(c->buf, "\r\n\r\n");
	if (!end)
		return c->len < sizeof(c->buf) - 1 ? 0 : -1;
	char *cl = strcasestr(c->buf, "\r\nContent-Length:");
	if (!cl || cl > end || strncmp(c->buf, "HTTP/1.1 200", 12))
		return -1;
	size_t body = strtoul(cl + 17, NULL, 10);
	size_t have = c->len - (size_t)(end + 4 - c->buf);
	if (have < body)
		return 0;
	count_tag(end + 4, body);
	return 1;
}

static void tcp_restart(struct conn *c)
{
	if (c->fd >= 0)
		tcp_close(c);
	if (tcp_open(c) < 0) {
		errors++;
		tcp_close(c);
		c->started = now();
	}
}

static void run_tcp(int crr, double seconds, int conc)
{
	static struct conn conns[MAX_CONC];
	struct epoll_event evs[MAX_CONC];
	uint64_t start = now(), stop = start + (uint64_t)(seconds * 1e9);

	for (int i = 0; i < conc; i++) {
		conns[i].fd = -1;
		tcp_restart(&conns[i]);
	}
	while (now() < stop) {
		int n = epoll_wait(epfd, evs, MAX_CONC, 50);
		uint64_t t = now();
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			if (!c->connected) {
				int err = 0;
				socklen_t len = sizeof(err);
				getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
				if (err || !(evs[i].events & EPOLLOUT)) {
					errors++;
					tcp_restart(c);
					continue;
				}
				c->connected = 1;
				add(&connect_ns, t - c->started);
				struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
				epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
				if (tcp_send(c) < 0) {
					errors++;
					tcp_restart(c);
				}
				continue;
			}
			int r = tcp_response(c);
			if (r == 0)
				continue;
			if (r < 0) {
				errors++;
				tcp_restart(c);
				continue;
			}
			ok++;
			add_op(now() - (crr ? c->started : c->op_started));
			if (crr)
				tcp_restart(c);
			else if (tcp_send(c) < 0) {
				errors++;
				tcp_restart(c);
			}
		}
		t = now();
		for (int i = 0; i < conc; i++) { /* nothing may hang forever */
			uint64_t since = conns[i].connected && !crr ? conns[i].op_started : conns[i].started;
			if (t - since > OP_TIMEOUT_NS) {
				errors++;
				stalls++;
				tcp_restart(&conns[i]);
			}
		}
	}
	/* Operations still in flight count with the time they have taken so far:
	 * one stuck behind a lost SYN must show in the percentiles, not vanish. */
	uint64_t t = now();
	for (int i = 0; i < conc; i++) {
		struct conn *c = &conns[i];
		if (c->fd < 0)
			continue;
		if (!c->connected)
			add(&connect_ns, t - c->started);
		if (crr || c->connected)
			add_op(t - (crr || !c->connected ? c->started : c->op_started));
	}
}

static void run_udp(double seconds, int conc)
{
	static int fds[MAX_CONC];
	static uint64_t sent[MAX_CONC];
	struct epoll_event evs[MAX_CONC];
	char buf[256];
	uint64_t start = now(), stop = start + (uint64_t)(seconds * 1e9);

	for (int i = 0; i < conc; i++) {
		fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
		const struct sockaddr_in *d = pick_dst();
		if (fds[i] < 0 || connect(fds[i], (const struct sockaddr *)d, sizeof(*d)) < 0)
			die("udp socket");
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
		epoll_ctl(epfd, EPOLL_CTL_ADD, fds[i], &ev);
		sent[i] = now();
		if (send(fds[i], "q", 1, 0) < 0)
			errors++;
	}
	while (now() < stop) {
		int n = epoll_wait(epfd, evs, MAX_CONC, 20);
		uint64_t t = now();
		for (int k = 0; k < n; k++) {
			int i = (int)evs[k].data.u32;
			ssize_t len = recv(fds[i], buf, sizeof(buf), 0);
			if (len < 0) {
				if (errno != EAGAIN)
					errors++;
				continue;
			}
			ok++;
			add_op(t - sent[i]);
			count_tag(buf, (size_t)len);
			sent[i] = now();
			if (send(fds[i], "q", 1, 0) < 0)
				errors++;
		}
		t = now();
		for (int i = 0; i < conc; i++) {
			if (t - sent[i] > UDP_TIMEOUT_NS) { /* lost: count it and ask again */
				errors++;
				stalls++;
				sent[i] = now();
				send(fds[i], "q", 1, 0);
			}
		}
	}
	uint64_t t = now();
	for (int i = 0; i < conc; i++) /* still unanswered: the time so far */
		add_op(t - sent[i]);
}

static _Noreturn void udp_server(const char *tag)
{
	enum { BATCH = 64 };
	struct mmsghdr msgs[BATCH];
	struct iovec in[BATCH], out[BATCH];
	struct sockaddr_in peers[BATCH];
	char bufs[BATCH][256];
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&dst, sizeof(dst)) < 0)
		die("udp-server bind");
	for (;;) {
		for (int i = 0; i < BATCH; i++) {
			in[i] = (struct iovec){bufs[i], sizeof(bufs[i])};
			msgs[i].msg_hdr = (struct msghdr){.msg_name = &peers[i],
							  .msg_namelen = sizeof(peers[i]),
							  .msg_iov = &in[i],
							  .msg_iovlen = 1};
		}
		int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("recvmmsg");
		}
		for (int i = 0; i < n; i++) {
			out[i] = (struct iovec){(void *)tag, strlen(tag)};
			msgs[i].msg_hdr.msg_iov = &out[i];
		}
		sendmmsg(fd, msgs, (unsigned)n, 0);
	}
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: loadgen crr|rr|udp IP[,IP...] PORT SECONDS CONCURRENCY\n"
				"       loadgen udp-server IP PORT TAG\n");
		return 2;
	}
	const char *mode = argv[1];
	for (char *ip = strtok(argv[2], ","); ip && ndsts < MAX_DSTS; ip = strtok(NULL, ",")) {
		struct sockaddr_in *d = &dsts[ndsts++];
		d->sin_family = AF_INET;
		d->sin_port = htons((uint16_t)atoi(argv[3]));
		if (inet_pton(AF_INET, ip, &d->sin_addr) != 1) {
			fprintf(stderr, "loadgen: bad address %s\n", ip);
			return 2;
		}
	}
	if (!ndsts)
		return 2;
	if (!strcmp(mode, "udp-server"))
		udp_server(argv[4]);
	if (argc < 6)
		return 2;
	double seconds = atof(argv[4]);
	int conc = atoi(argv[5]);
	if (conc < 1 || conc > MAX_CONC || seconds <= 0) {
		fprintf(stderr, "loadgen: concurrency 1..%d and a positive duration\n", MAX_CONC);
		return 2;
	}
	epfd = epoll_create1(0);
	if (epfd < 0)
		die("epoll_create1");
	uint64_t t0 = now();
	if (!strcmp(mode, "crr") || !strcmp(mode, "rr"))
		run_tcp(!strcmp(mode, "crr"), seconds, conc);
	else if (!strcmp(mode, "udp"))
		run_udp(seconds, conc);
	else {
		fprintf(stderr, "loadgen: unknown mode %s\n", mode);
		return 2;
	}
	double elapsed = (double)(now() - t0) / 1e9;
	qsort(connect_ns.v, connect_ns.n, sizeof(uint64_t), cmp);
	qsort(op_ns.v, op_ns.n, sizeof(uint64_t), cmp);
	printf("{\"mode\": \"%s\", \"ok\": %llu, \"errors\": %llu, \"stalls\": %llu, "
	       "\"seconds\": %.4f, \"rate\": %.1f, "
	       "\"connect_p50_us\": %.1f, \"connect_p99_us\": %.1f, "
	       "\"latency_p50_us\": %.1f, \"latency_p99_us\": %.1f, \"replies\": {",
	       mode, (unsigned long long)ok, (unsigned long long)errors, (unsigned long long)stalls,
	       elapsed, (double)ok / elapsed,
	       pct(&connect_ns, 0.5), pct(&connect_ns, 0.99), pct(&op_ns, 0.5), pct(&op_ns, 0.99));
	for (int i = 0, first = 1; i < MAX_TAGS && tags[i][0]; i++, first = 0)
		printf("%s\"%s\": %llu", first ? "" : ", ", tags[i], (unsigned long long)tag_count[i]);
	printf("}}\n");
	return 0;
}
