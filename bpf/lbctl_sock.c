/* lbctl cgroup socket hooks: Service balancing for the node's own processes.
 *
 * Processes in the node's network namespace (kubelet, hostNetwork pods)
 * send packets that never cross a tc ingress hook, so their connections are
 * translated at the socket instead, before a packet exists:
 *
 *   connect4     TCP connect() and UDP connect() to a frontend go to a
 *                backend chosen like tc chooses one (lb4_choose); a
 *                frontend without backends fails the call at once
 *   sendmsg4     the same for each unconnected UDP sendto()
 *   recvmsg4     a UDP datagram from a backend the socket was sent to reads
 *                as coming from the service address (recvfrom's source)
 *   getpeername4 getpeername() shows the service address, not the backend
 *
 * The first two record, per socket (bpf_get_socket_cookie) and backend,
 * which service address was asked for (sock4_rev); the last two read it.
 * Entries are never deleted: sock4_rev is an LRU map and a socket cookie is
 * never reused, so a stale entry only waits for eviction.
 *
 * Every hook first checks that the socket lives in the node's network
 * namespace (lb4_config.netns_cookie): the programs are attached to a cgroup,
 * and a cgroup can hold processes of other namespaces (pods, whose traffic
 * tc already balances).  Without that setting nothing is translated.
 *
 * Each datagram of an unconnected UDP socket chooses its backend afresh, as
 * it has no connection to remember one by; connected sockets (glibc's and
 * Go's resolvers connect) keep theirs.
 */

#define SOCK_ALLOW 1 /* the call proceeds (with the rewritten address, if any) */
#define SOCK_REFUSE 0 /* the call fails: EPERM, or the bpf_set_retval() code */

#ifndef ECONNREFUSED
#define ECONNREFUSED 111
#endif

/* Is the socket in the node's network namespace? */
static __always_inline int sock4_on_node(struct bpf_sock_addr *ctx)
{
	struct lb4_config *cfg = lb4_settings();

	if (!cfg || !cfg->netns_cookie)
		return 0;
	return bpf_get_netns_cookie(ctx) == cfg->netns_cookie;
}

/* The frontend a connect/sendmsg address names, or NULL.  The lookup takes
 * a pkt4, so the socket's destination is dressed up as one. */
static __always_inline struct lb_service *sock4_frontend(struct bpf_sock_addr *ctx,
							 struct pkt4 *p)
{
	__u32 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return NULL;
	p->daddr = ctx->user_ip4;
	p->dport = (__be16)ctx->user_port; /* network order in the low 16 bits */
	p->proto = proto;
	return lb4_lookup(p, LB_SCOPE_ALL);
}

/* connect4 and sendmsg4: send the socket to a backend of the frontend it
 * names, and remember the frontend for the reverse hooks. */
static __always_inline int sock4_forward(struct bpf_sock_addr *ctx)
{
	struct pkt4 p = {};
	struct sock4_rev_key rk = {};
	struct sock4_rev rev = {};
	struct lb_service *svc;
	struct lb4_backend *be;
	struct lb4_config *cfg;
	__u32 backend_id = 0;

	if (!sock4_on_node(ctx))
		return SOCK_ALLOW;
	svc = sock4_frontend(ctx, &p);
	if (!svc)
		return SOCK_ALLOW; /* not a service address: untouched */

	/* The hashes and ClientIP affinity see the node's address as the
	 * client.  The source port is not chosen yet: a random one spreads the
	 * node's own connections under maglev (sh keeps them on one backend,
	 * as it does any one client). */
	cfg = lb4_settings();
	p.saddr = cfg ? cfg->snat_addr : 0;
	p.sport = (__be16)bpf_get_prandom_u32();
	be = lb4_choose(svc, &p, bpf_ktime_get_ns(), &backend_id);
	if (!be) {
		/* kube-proxy rejects a Service without endpoints, which a local
		 * caller sees as ECONNREFUSED; a frontend whose backends are all
		 * on other nodes (LB_SVC_F_DROP_EMPTY) is a DROP rule there,
		 * which a local caller sees as EPERM: the default for 0. */
		if (!(svc->flags & LB_SVC_F_DROP_EMPTY))
			bpf_set_retval(-ECONNREFUSED);
		stat_inc(LB_STAT_SOCK_REJECT);
		return SOCK_REFUSE;
	}

	/* Written before the address changes: a reply cannot arrive before
	 * the call returns, so the reverse hooks always find it. */
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = be->addr;
	rk.port = be->port;
	rev.vip = p.daddr;
	rev.vport = p.dport;
	sock4_rev.update(&rk, &rev);

	ctx->user_ip4 = be->addr;
	ctx->user_port = be->port;
	stat_inc(LB_STAT_SOCK_TRANSLATE);
	return SOCK_ALLOW;
}

/* recvmsg4 and getpeername4: a backend this socket was sent to reads as the
 * service address it asked for.  These hooks must return 1 (the verifier
 * allows nothing else): they can only rewrite. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	struct sock4_rev_key rk = {};
	struct sock4_rev *rev;

	if (!sock4_on_node(ctx))
		return SOCK_ALLOW;
	rk.cookie = bpf_get_socket_cookie(ctx);
	rk.addr = ctx->user_ip4;
	rk.port = (__be16)ctx->user_port;
	rev = sock4_rev.lookup(&rk);
	if (rev) {
		ctx->user_ip4 = rev->vip;
		ctx->user_port = rev->vport;
	}
	return SOCK_ALLOW;
}

int lbctl_sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx);
}

int lbctl_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_forward(ctx);
}

int lbctl_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

int lbctl_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}
