/* The connection table: forward and reverse entries of balanced flows. */
#ifndef LBCTL_CONNTRACK_H
#define LBCTL_CONNTRACK_H

/* How long ago `then` was, as of `now`.  Another CPU may have stamped an
 * entry after this program read the clock: then `then` is later than `now`,
 * and plain unsigned subtraction would make a flow touched this instant look
 * ages old (expired, its NAT port free to take, its affinity lapsed). */
static __always_inline __u64 age_ns(__u64 now, __u64 then)
{
	return now > then ? now - then : 0;
}

static __always_inline __u64 ct_lifetime(const struct ct4_entry *e, __u8 proto)
{
	if (proto != IPPROTO_TCP)
		return LBCTL_CT_UDP_TIMEOUT_NS;
	if (e->flags & CT_F_CLOSING)
		return LBCTL_CT_TCP_CLOSING_TIMEOUT_NS;
	if (!(e->flags & CT_F_SEEN_REPLY))
		return LBCTL_CT_TCP_SYN_TIMEOUT_NS;
	return LBCTL_CT_TCP_TIMEOUT_NS;
}

static __always_inline int ct_alive(const struct ct4_entry *e, __u8 proto, __u64 now)
{
	return age_ns(now, e->last_seen_ns) <= ct_lifetime(e, proto);
}

/* Refresh last_seen at most once per LBCTL_CT_REFRESH_NS, so established
 * flows do not write to a shared cache line on every packet; returns 1 when
 * it did.  A FIN or RST closes the flow: it stops counting for lc.  `reply`
 * says which side sent p; a FIN from each side (or a RST) marks the flow
 * CT_F_CLOSED, after which its NAT port may go to a new flow (nat4_stale). */
static __always_inline int ct_touch(struct ct4_entry *e, const struct pkt4 *p, __u64 now,
				    int reply)
{
	int refreshed = 0;
	__u8 fin;

	if (age_ns(now, e->last_seen_ns) > LBCTL_CT_REFRESH_NS) {
		e->last_seen_ns = now;
		refreshed = 1;
	}
	if (!(p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))) {
		/* The client's ACK after both FINs, its own first, is its last:
		 * it acknowledges the backend's FIN, whose socket then closes. */
		if (!reply && (e->flags & (CT_F_CLOSED | CT_F_REPLY_CLOSED_FIRST)) == CT_F_CLOSED &&
		    !e->done && (p->tcp_flags & TCP_FLAG_ACK)) {
			e->done = CT_DONE_ACKED;
			e->last_seen_ns = now;
		}
		return refreshed;
	}
	if (!(e->flags & CT_F_CLOSING)) {
		e->flags |= CT_F_CLOSING;
		e->last_seen_ns = now;
		lb_conn_close(e);
	}
	fin = (p->tcp_flags & TCP_FLAG_RST) ? CT_F_CLOSED : reply ? CT_F_FIN_REPLY : CT_F_FIN_ORIG;
	if (p->tcp_flags & TCP_FLAG_RST)
		e->done = CT_DONE_ACKED; /* whichever side sent it, the backend's socket ends */
	if ((e->flags & fin) != fin) {
		if (fin == CT_F_FIN_REPLY && !(e->flags & CT_F_FIN_ORIG))
			fin |= CT_F_REPLY_CLOSED_FIRST;
		e->flags |= fin;
		if ((e->flags & CT_F_CLOSED) == CT_F_CLOSED)
			e->last_seen_ns = now;
	}
	return refreshed;
}

/* The key of the packet's own tuple: a forward entry (CT_DIR_FORWARD) for a
 * client's packet, a reverse or NAT entry (CT_DIR_REVERSE) for a reply. */
static __always_inline void ct4_packet_key(struct ct4_key *k, const struct pkt4 *p, __u8 dir)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->sport = p->sport;
	k->dport = p->dport;
	k->proto = p->proto;
	k->dir = dir;
	k->pad = 0;
}

static __always_inline void ct4_forward_key(struct ct4_key *k, const struct pkt4 *p)
{
	ct4_packet_key(k, p, CT_DIR_FORWARD);
}

/* Record a new flow client -> vip:vport balanced to backend be, as fresh
 * entries (a reused tuple starts with clean flags, but for `flags`:
 * CT_F_LC, CT_F_AFFINITY).  With BPF_NOEXIST the
 * forward insert fails when another CPU recorded the same new flow first;
 * the caller then follows that entry instead.  A masqueraded flow (snat_addr
 * set) has its reverse entry in nat4, made by nat4_bind.  CT_FAILED: the
 * table is full (a plain hash: nothing is evicted for the new flow), and
 * nothing of the flow was recorded. */
#ifndef EEXIST
#define EEXIST 17
#endif
#define CT_CREATED 0
#define CT_LOST_RACE 1
#define CT_FAILED -1

static __always_inline int ct4_create(const struct pkt4 *p, const struct lb4_backend *be,
				      __u32 backend_id, __u32 frontend_id, __u64 now,
				      int exclusive, __be32 snat_addr, __be16 snat_port,
				      __u8 flags)
{
	struct ct4_key k = {}, fwd;
	struct ct4_entry e = {};
	__u64 open;
	int rc;

	e.created_ns = now;
	e.last_seen_ns = now;
	e.backend_id = backend_id;
	e.frontend_id = frontend_id;
	e.flags = flags;
	if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		e.flags |= CT_F_CLOSING;
	else if (flags & CT_F_LC)
		e.open = 1;

	ct4_forward_key(&k, p);
	e.nat_addr = be->addr;
	e.nat_port = be->port;
	e.snat_addr = snat_addr;
	e.snat_port = snat_port;
	rc = exclusive ? ct4.insert(&k, &e) : ct4.update(&k, &e);
	if (rc)
		return rc == -EEXIST ? CT_LOST_RACE : CT_FAILED; /* else the table is full */
	open = e.open;
	if (snat_addr) {
		if (open)
			lb_conn_open(backend_id);
		return CT_CREATED;
	}
	fwd = k;

	k.saddr = be->addr;
	k.daddr = p->saddr;
	k.sport = be->port;
	k.dport = p->sport;
	k.dir = CT_DIR_REVERSE;
	e.nat_addr = p->daddr;
	e.nat_port = p->dport;
	e.snat_addr = 0;
	e.snat_port = 0;
	e.open = 0; /* the forward entry alone counts */
	if (ct4.update(&k, &e)) {
		/* No room for the reverse entry: a forward entry alone would
		 * send the flow on while its replies go back untranslated. */
		ct4.delete(&fwd);
		return CT_FAILED;
	}
	if (open)
		lb_conn_open(backend_id);
	return CT_CREATED;
}

/* Put back the reverse entry of the flow fwd (of client packet p) that a
 * direct flow took over (CT_RETIRED_REPLY): this flow speaks again. */
static __always_inline void ct4_restore_reverse(struct ct4_entry *fwd, const struct pkt4 *p)
{
	struct ct4_key k = {};
	struct ct4_entry e = *fwd;

	fwd->retired = 0;
	k.saddr = fwd->nat_addr;
	k.daddr = p->saddr;
	k.sport = fwd->nat_port;
	k.dport = p->sport;
	k.proto = p->proto;
	k.dir = CT_DIR_REVERSE;
	e.nat_addr = p->daddr;
	e.nat_port = p->dport;
	e.snat_addr = 0;
	e.snat_port = 0;
	e.open = 0;
	e.retired = 0;
	ct4.update(&k, &e);
}

#endif /* LBCTL_CONNTRACK_H */
