/* The decisions tc and XDP share: what a packet of a balanced flow becomes.
 *
 *   flow4_decide()  reads the maps: is the packet part of a known flow, a new
 *                   flow to a frontend, a reply, or none of these, and what is
 *                   its tuple after translation; its only writes are the
 *                   scheduler's (the rr turn, the client's affinity entry);
 *   flow4_commit()  makes the decision stick: refreshes conntrack, takes a NAT
 *                   port and records a new flow (with the race handling).
 *
 * tc calls them back to back, and so does XDP.  A packet XDP then cannot
 * forward itself goes to tc untouched, and tc follows the flow XDP recorded:
 * the same backend, the same NAT port, and the neighbour of that backend
 * gets resolved (tc deciding afresh would leave it unresolved for XDP).
 */
#ifndef LBCTL_FLOW_H
#define LBCTL_FLOW_H

#define FLOW_PASS 0    /* not a balanced flow: pass it untouched */
#define FLOW_FOLLOW 1  /* a packet of a known flow */
#define FLOW_RESTART 2 /* a SYN reusing the tuple of a flow whose backend is still
			* in the service: the same backend, fresh entries */
#define FLOW_NEW 3     /* a new flow: backend chosen, nothing recorded yet */
#define FLOW_REPLY 4   /* a reply, confirmed by its flow's forward entry */
#define FLOW_DROP 5    /* drop it, counted as flow4.stat */
#define FLOW_REJECT 6  /* a new flow to a frontend without backends */
#define FLOW_RACED 7   /* commit only: another CPU recorded this new flow first;
			* the translation is now that flow's */
#define FLOW_RETIRE 8  /* not a balanced flow, but a balanced flow holds its reply
			* tuple: pass it, and retire that flow's reverse (or NAT)
			* entry (flow4_retire) so its replies stay untouched */

struct flow4 {
	/* The tuple after translation. */
	__be32 saddr;
	__be32 daddr;
	__be16 sport; /* a new masqueraded flow: its NAT port once committed */
	__be16 dport;
	__u8 snat;    /* the source changes */
	__u8 dnat;    /* the destination changes */
	__u8 reply;   /* a reply: the source is rewritten first */
	__u8 ct_flags; /* NEW: CT_F_LC, CT_F_AFFINITY of the frontend */
	__u32 stat;   /* LB_STAT_* of the verdict */
	__u32 frontend_id; /* whose lb_fe_stats count the packet (0: none) */
	/* What flow4_commit() needs. */
	__u32 backend_id;
	struct ct4_entry *ct;   /* FOLLOW, RESTART: the forward entry; REPLY: the
				 * flow's forward entry; NEW: the expired or stale
				 * entry the flow replaces, if any */
	struct lb4_backend *be; /* NEW: the chosen backend */
	/* What flow4_retire() removes. */
	struct ct4_key retire;  /* RETIRE: the reverse entry (in ct4) or the NAT
				 * binding (in nat4) holding the reply tuple */
	__u8 retire_nat;        /* RETIRE: the entry is in nat4 */
};

static __always_inline int is_new_tcp(const struct pkt4 *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

static __always_inline int is_syn_ack(const struct pkt4 *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == (TCP_FLAG_SYN | TCP_FLAG_ACK);
}

/* Tuple clashes: a client that reaches a backend through a Service and also
 * straight at the backend's own address (a StatefulSet behind a headless and
 * a normal Service, Prometheus scraping pods) may reuse a source port:
 *   balanced: client:p -> VIP:80, replies backend:8080 -> client:p
 *   direct:   client:p -> backend:8080, replies backend:8080 -> client:p
 * The replies are the same tuple, and the balanced flow's reverse entry would
 * rewrite the direct flow's replies to come from the VIP.  Netfilter keeps
 * the two apart by tracking every flow; lbctl tracks only balanced ones, so
 * it lets the direct flow take the tuple over (flow4_retire) when the
 * balanced flow cannot need it any more:
 *   - a TCP SYN of the direct flow, seen here, takes over from a balanced
 *     flow that is closing (a FIN or RST passed) or dead; an open balanced
 *     connection keeps the tuple (the backend itself would answer the SYN
 *     with that connection's ACK, not a SYN-ACK);
 *   - a SYN-ACK from the backend is never part of a closing balanced flow:
 *     it answers a direct SYN this node did not see (the node's own
 *     sockets), and takes the tuple over too;
 *   - UDP has no end: the newest sender owns the reply tuple.  A direct
 *     datagram takes it; the balanced flow's next datagram takes it back
 *     (CT_RETIRED_REPLY), so a socket that talks to both keeps working,
 *     each reply going to whoever spoke last.
 * A TCP flow that was retired gets its reverse entry back when a SYN to the
 * VIP restarts it. */
static __always_inline int flow4_retire_entry(const struct ct4_key *k, struct ct4_entry *fwd,
					      int nat, struct flow4 *x)
{
	x->retire = *k;
	x->retire_nat = nat;
	x->ct = nat ? NULL : fwd; /* NAT bindings are not put back: see nat4_held */
	x->frontend_id = 0;
	x->stat = LB_STAT_PASS;
	return FLOW_RETIRE;
}

/* The translation of a forward packet of the flow ct. */
static __always_inline int flow4_follow(const struct pkt4 *p, struct ct4_entry *ct,
					struct flow4 *x, int verdict, __u32 stat)
{
	x->daddr = ct->nat_addr;
	x->dport = ct->nat_port;
	x->dnat = 1;
	x->snat = ct->snat_addr != 0;
	x->saddr = x->snat ? ct->snat_addr : p->saddr;
	x->sport = x->snat ? ct->snat_port : p->sport;
	x->reply = 0;
	x->stat = stat;
	x->frontend_id = ct->frontend_id;
	x->ct = ct;
	return verdict;
}

/* A new flow to frontend svc: choose a backend and whether to masquerade. */
static __always_inline int flow4_new(const struct pkt4 *p, const struct lb_service *svc,
				     int masq, int internal, const struct lb4_config *cfg,
				     struct ct4_entry *old, __u64 now, struct flow4 *x)
{
	struct lb4_backend *be;
	__u32 backend_id = 0;

	x->frontend_id = svc->frontend_id; /* for its counters, whatever happens */
	be = lb4_choose(svc, p, now, &backend_id);
	if (!be) {
		if (svc->flags & LB_SVC_F_DROP_EMPTY) {
			x->stat = LB_STAT_DROP_NO_LOCAL;
			return FLOW_DROP;
		}
		/* A new connection is refused at once; anything else of a flow
		 * that has no backend any more is dropped. */
		if (p->proto == IPPROTO_UDP || is_new_tcp(p)) {
			x->stat = LB_STAT_REJECT;
			return FLOW_REJECT;
		}
		x->stat = LB_STAT_DROP_NO_BACKEND;
		return FLOW_DROP;
	}
	masq = masq4_backend(p, cfg, be, masq, internal);
	x->snat = masq && cfg && cfg->snat_addr;
	x->saddr = x->snat ? cfg->snat_addr : p->saddr;
	x->sport = p->sport; /* the NAT port is taken by flow4_commit() */
	x->daddr = be->addr;
	x->dport = be->port;
	x->dnat = 1;
	x->reply = 0;
	x->stat = LB_STAT_DNAT_NEW;
	x->backend_id = backend_id;
	x->frontend_id = svc->frontend_id;
	x->ct_flags = (svc->sched == LB_SCHED_LC ? CT_F_LC : 0) |
		      (svc->affinity_s ? CT_F_AFFINITY : 0);
	x->be = be;
	x->ct = old;
	return FLOW_NEW;
}

/* Is p a live reply of the flow fwd? */
static __always_inline int reply_matches(const struct ct4_entry *fwd, const struct pkt4 *p,
					 __u64 now)
{
	return fwd->nat_addr == p->saddr && fwd->nat_port == p->sport &&
	       ct_alive(fwd, p->proto, now);
}

/* A reply of a masqueraded flow: back to the client, from the VIP. */
static __always_inline int flow4_reply_snat(const struct pkt4 *p, __u64 now, struct flow4 *x,
					    int direct)
{
	struct ct4_key k = {};
	struct nat4_entry *nat;
	struct ct4_entry *fwd;

	ct4_packet_key(&k, p, CT_DIR_REVERSE);
	nat = nat4.lookup(&k);
	if (!nat)
		return FLOW_PASS;
	fwd = nat4_forward(nat, p->proto);
	if (!fwd || fwd->snat_addr != p->daddr || fwd->snat_port != p->dport)
		return FLOW_PASS;
	if (!reply_matches(fwd, p, now))
		return FLOW_PASS;
	if (is_syn_ack(p) && (fwd->flags & CT_F_CLOSING))
		return direct ? flow4_retire_entry(&k, fwd, 1, x) : FLOW_PASS;
	x->saddr = nat->vip;
	x->sport = nat->vport;
	x->daddr = nat->client_addr;
	x->dport = nat->client_port;
	x->snat = 1;
	x->dnat = 1;
	x->reply = 1;
	x->stat = LB_STAT_SNAT_REVERSE;
	x->frontend_id = fwd->frontend_id;
	x->ct = fwd;
	return FLOW_REPLY;
}

/* A reply from a backend: the VIP becomes its source again. */
static __always_inline int flow4_reply(const struct pkt4 *p, const struct lb4_config *cfg,
				       __u64 now, struct flow4 *x, int direct)
{
	struct ct4_key k = {};
	struct ct4_entry *rev, *fwd;

	if (cfg && cfg->snat_addr && p->daddr == cfg->snat_addr)
		return flow4_reply_snat(p, now, x, direct);
	ct4_packet_key(&k, p, CT_DIR_REVERSE);
	rev = ct4.lookup(&k);
	if (!rev)
		return FLOW_PASS;
	/* The forward twin decides: it must still point at this backend (a later
	 * direct connection to the pod reusing the tuple is not ours) and be
	 * alive.  It is refreshed by both directions, so a flow lives as long as
	 * either side talks. */
	k.saddr = p->daddr;
	k.daddr = rev->nat_addr;
	k.sport = p->dport;
	k.dport = rev->nat_port;
	k.dir = CT_DIR_FORWARD;
	fwd = ct4.lookup(&k);
	if (!fwd || fwd->snat_addr || !reply_matches(fwd, p, now))
		return FLOW_PASS;
	if (is_syn_ack(p) && (fwd->flags & CT_F_CLOSING)) {
		if (!direct)
			return FLOW_PASS;
		ct4_packet_key(&k, p, CT_DIR_REVERSE);
		return flow4_retire_entry(&k, fwd, 0, x);
	}
	x->saddr = rev->nat_addr;
	x->sport = rev->nat_port;
	x->daddr = p->daddr;
	x->dport = p->dport;
	x->snat = 1;
	x->dnat = 0;
	x->reply = 1;
	x->stat = LB_STAT_RNAT;
	x->frontend_id = fwd->frontend_id;
	x->ct = fwd;
	return FLOW_REPLY;
}

/* Is the flow's backend an address of this node?  Its datagrams, once
 * translated, go to the node's own stack, and on the way may pass an lbctl
 * hook a second time: a bridge hands a frame its port's hook translated up
 * to the node through the bridge device's own hook.  There a translated
 * datagram looks exactly like a direct one, so UDP to the node's own
 * addresses never takes a reply tuple over (a TCP SYN is safe: the flow it
 * belongs to is never closing). */
static __always_inline int lb4_backend_on_node(const struct ct4_entry *fwd)
{
	__u32 id = fwd->backend_id;
	struct lb4_backend *be = lb4_backends.lookup(&id);

	return be && (be->flags & LB_BACKEND_F_HOST);
}

/* A client's packet to no frontend, straight to an address and port that a
 * balanced flow of the same client port has as its backend: does it take
 * that flow's reply tuple over (see flow4_retire_entry)? */
static __always_inline int flow4_direct(const struct pkt4 *p, __u64 now, struct flow4 *x)
{
	struct ct4_key k = {}, fk = {};
	struct ct4_entry *rev, *fwd;

	if (!is_new_tcp(p) && p->proto != IPPROTO_UDP)
		return FLOW_PASS;
	k.saddr = p->daddr;
	k.daddr = p->saddr;
	k.sport = p->dport;
	k.dport = p->sport;
	k.proto = p->proto;
	k.dir = CT_DIR_REVERSE;
	rev = ct4.lookup(&k);
	if (!rev)
		return FLOW_PASS;
	fk.saddr = p->saddr;
	fk.daddr = rev->nat_addr;
	fk.sport = p->sport;
	fk.dport = rev->nat_port;
	fk.proto = p->proto;
	fk.dir = CT_DIR_FORWARD;
	fwd = ct4.lookup(&fk);
	if (!fwd || fwd->snat_addr || fwd->nat_addr != p->daddr || fwd->nat_port != p->dport ||
	    !ct_alive(fwd, p->proto, now))
		return flow4_retire_entry(&k, NULL, 0, x); /* a leftover: nobody's */
	if (p->proto == IPPROTO_TCP && !(fwd->flags & CT_F_CLOSING))
		return FLOW_PASS; /* an open connection keeps its tuple */
	if (p->proto == IPPROTO_UDP && lb4_backend_on_node(fwd))
		return FLOW_PASS; /* maybe this flow's own datagram, seen again */
	return flow4_retire_entry(&k, fwd, 0, x);
}

/* What p is and what it becomes; FLOW_DROP sets x->stat.  `direct`: check
 * whether a packet to no frontend takes a balanced flow's reply tuple over
 * (tc); XDP leaves those packets to tc, which decides afresh. */
static __always_inline int flow4_decide(const struct pkt4 *p, const struct lb4_config *cfg,
					__u64 now, struct flow4 *x, int direct)
{
	struct ct4_key k = {};
	struct ct4_entry *ct;
	struct lb_service *svc = NULL;
	int rc, masq = 0, internal = -1;

	ct4_forward_key(&k, p);
	ct = ct4.lookup(&k);
	if (ct && ct_alive(ct, p->proto, now)) {
		/* An established TCP connection keeps its backend until it ends. */
		if (p->proto == IPPROTO_TCP && !is_new_tcp(p))
			return flow4_follow(p, ct, x, FLOW_FOLLOW, LB_STAT_DNAT_EST);
		/* A SYN on a known tuple is a new connection reusing the port, and
		 * a UDP flow has no end: both keep their backend only while it is
		 * still in the service (kube-proxy likewise flushes the UDP
		 * conntrack of removed endpoints).  The new connection starts
		 * with clean flags; its NAT binding, if any, stays its own,
		 * unless a new flow took it after this one closed. */
		if (lb4_backend_member(ct) && nat4_held(ct, p)) {
			if (is_new_tcp(p))
				return flow4_follow(p, ct, x, FLOW_RESTART, LB_STAT_DNAT_NEW);
			return flow4_follow(p, ct, x, FLOW_FOLLOW, LB_STAT_DNAT_EST);
		}
	}

	rc = lb4_frontend(p, cfg, &svc, &masq, &internal);
	if (rc == FRONTEND_DENIED) {
		x->stat = LB_STAT_DROP_SOURCE_RANGE;
		x->frontend_id = svc ? svc->frontend_id : 0;
		return FLOW_DROP;
	}
	if (rc == FRONTEND_OK && svc)
		return flow4_new(p, svc, masq, internal, cfg, ct, now, x);
	rc = flow4_reply(p, cfg, now, x, direct);
	if (rc == FLOW_PASS && direct)
		rc = flow4_direct(p, now, x);
	return rc;
}

/* Record the new flow x: NAT port, conntrack.  Returns FLOW_NEW, FLOW_RACED
 * (x now follows the flow another CPU recorded) or FLOW_DROP (no NAT port,
 * or no room in the conntrack table). */
static __always_inline int flow4_record(const struct pkt4 *p, const struct lb4_config *cfg,
					__u64 now, struct flow4 *x)
{
	struct ct4_key k = {};
	struct lb4_backend *be = x->be;
	struct ct4_entry *ct;
	__be32 snat_addr = 0;
	__be16 snat_port = 0;
	int rc;

	if (!be)
		return FLOW_PASS;
	if (x->snat) {
		if (!cfg || nat4_bind(p, be, cfg, now, &snat_port)) {
			x->stat = LB_STAT_NAT_EXHAUSTED;
			return FLOW_DROP;
		}
		snat_addr = x->saddr;
		x->sport = snat_port;
		stat_inc(LB_STAT_SNAT_NEW);
	}
	/* The flow this one replaces stops counting for lc.  With no entry
	 * yet, insert exclusively: when the first packets of a flow race on two
	 * CPUs, the loser follows the winner's choice. */
	if (x->ct)
		lb_conn_close(x->ct);
	rc = ct4_create(p, be, x->backend_id, x->frontend_id, now, x->ct == NULL, snat_addr,
			snat_port, x->ct_flags);
	if (rc == CT_LOST_RACE) {
		if (snat_addr)
			nat4_unbind(be, snat_addr, snat_port, p->proto);
		ct4_forward_key(&k, p);
		ct = ct4.lookup(&k);
		if (ct)
			return flow4_follow(p, ct, x, FLOW_RACED, LB_STAT_DNAT_EST);
	} else if (rc == CT_FAILED) {
		/* The table is full: the new flow is dropped (its client
		 * retries), never sent on untracked, whose replies would go
		 * back untranslated. */
		if (snat_addr)
			nat4_unbind(be, snat_addr, snat_port, p->proto);
		x->stat = LB_STAT_CT_FULL;
		return FLOW_DROP;
	}
	return FLOW_NEW;
}

/* Make the decision stick; returns the verdict to act on (FLOW_FOLLOW,
 * FLOW_NEW, FLOW_REPLY, FLOW_RACED or FLOW_DROP). */
static __always_inline int flow4_commit(const struct pkt4 *p, const struct lb4_config *cfg,
					__u64 now, int verdict, struct flow4 *x)
{
	struct ct4_entry *ct = x->ct;

	if (verdict == FLOW_NEW)
		return flow4_record(p, cfg, now, x);
	if (verdict != FLOW_FOLLOW && verdict != FLOW_RESTART && verdict != FLOW_REPLY)
		return verdict;
	if (!ct)
		return FLOW_PASS;
	if (ct->retired && verdict != FLOW_REPLY && (verdict == FLOW_RESTART || p->proto != IPPROTO_TCP))
		ct4_restore_reverse(ct, p);
	if (verdict == FLOW_RESTART) {
		ct->flags &= CT_F_LC | CT_F_AFFINITY;
		ct->done = 0;
		ct->assured = 0;
		ct->created_ns = now;
		ct->last_seen_ns = now;
		/* The new connection counts for lc unless the old one still did. */
		if ((ct->flags & CT_F_LC) && !ct->open && !__sync_fetch_and_or(&ct->open, 1))
			lb_conn_open(ct->backend_id);
		return FLOW_FOLLOW;
	}
	if (ct_touch(ct, p, now, verdict == FLOW_REPLY) && verdict == FLOW_FOLLOW &&
	    (ct->flags & CT_F_AFFINITY))
		lb4_affinity_touch(ct, p->saddr, now);
	if (verdict == FLOW_REPLY && !(ct->flags & CT_F_SEEN_REPLY))
		ct->flags |= CT_F_SEEN_REPLY;
	else if (verdict == FLOW_FOLLOW && !ct->assured && (ct->flags & CT_F_SEEN_REPLY))
		ct->assured = 1;
	if (verdict == FLOW_FOLLOW && (ct->flags & CT_F_UNCOUNTED)) {
		/* The first packet of a flow XDP recorded and left to us. */
		ct->flags &= ~CT_F_UNCOUNTED;
		x->stat = LB_STAT_DNAT_NEW;
	}
	return verdict;
}

/* FLOW_RETIRE: remove the entry that held a direct flow's reply tuple. */
static __always_inline void flow4_retire(struct flow4 *x)
{
	if (x->retire_nat)
		nat4.delete(&x->retire);
	else
		ct4.delete(&x->retire);
	if (x->ct)
		x->ct->retired = CT_RETIRED_REPLY;
	stat_inc(LB_STAT_REPLY_RETIRED);
}

#endif /* LBCTL_FLOW_H */
