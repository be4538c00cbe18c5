/* lbctl tc program (clsact ingress, direct action): Service balancing.
 *
 * For every IPv4 TCP/UDP packet:
 *   1. an established flow (forward conntrack hit) is translated as its
 *      first packet was: DNAT to its backend, SNAT when masqueraded;
 *   2. a packet to a service frontend starts a flow: source ranges are
 *      checked, a backend is chosen, masquerading decided (nat.h), conntrack
 *      remembers it all, and the packet is translated; a frontend without
 *      backends rejects it (TCP reset, ICMP unreachable), or drops it when
 *      its backends are only on other nodes (externalTrafficPolicy Local);
 *   3. a reply from a backend (reverse conntrack or NAT hit, confirmed by
 *      its forward twin) is translated back so the client sees the VIP;
 *   4. everything else passes untouched.
 */

static __always_inline int is_new_tcp(const struct pkt4 *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* DNAT to addr:port, SNAT to snat_addr:snat_port when set, then forward. */
static __always_inline int translate4(struct __sk_buff *skb, struct pkt4 *p, __be32 addr,
				      __be16 port, __be32 snat_addr, __be16 snat_port,
				      __u32 stat)
{
	if (rewrite4(skb, p, 0, addr, port))
		return TC_ACT_SHOT;
	if (snat_addr && rewrite4(skb, p, 1, snat_addr, snat_port))
		return TC_ACT_SHOT;
	stat_inc(stat);
	return forward4(skb, p);
}

static __always_inline int follow4(struct __sk_buff *skb, struct pkt4 *p,
				   const struct ct4_entry *ct, __u32 stat)
{
	return translate4(skb, p, ct->nat_addr, ct->nat_port, ct->snat_addr, ct->snat_port,
			  stat);
}

/* Confirm a reply against the flow's forward entry and refresh it. */
static __always_inline int reply_of(struct ct4_entry *fwd, const struct pkt4 *p, __u64 now)
{
	if (!fwd || fwd->nat_addr != p->saddr || fwd->nat_port != p->sport)
		return 0;
	if (!ct_alive(fwd, p->proto, now))
		return 0;
	ct_touch(fwd, p, now);
	if (!(fwd->flags & CT_F_SEEN_REPLY))
		fwd->flags |= CT_F_SEEN_REPLY;
	return 1;
}

/* A reply of a masqueraded flow: back to the client, from the VIP. */
static __always_inline int reverse_snat4(struct __sk_buff *skb, struct pkt4 *p, __u64 now)
{
	struct ct4_key k = {};
	struct nat4_entry *nat;
	struct ct4_entry *fwd;
	__be32 client_addr;
	__be16 client_port;

	k.saddr = p->saddr;
	k.daddr = p->daddr;
	k.sport = p->sport;
	k.dport = p->dport;
	k.proto = p->proto;
	k.dir = CT_DIR_REVERSE;
	nat = nat4.lookup(&k);
	if (!nat)
		return -1;
	client_addr = nat->client_addr;
	client_port = nat->client_port;
	k.saddr = client_addr;
	k.daddr = nat->vip;
	k.sport = client_port;
	k.dport = nat->vport;
	k.dir = CT_DIR_FORWARD;
	fwd = ct4.lookup(&k);
	if (!fwd || fwd->snat_addr != p->daddr || fwd->snat_port != p->dport)
		return -1;
	if (!reply_of(fwd, p, now))
		return -1;
	if (rewrite4(skb, p, 1, k.daddr, k.dport))
		return TC_ACT_SHOT;
	if (rewrite4(skb, p, 0, client_addr, client_port))
		return TC_ACT_SHOT;
	stat_inc(LB_STAT_SNAT_REVERSE);
	return forward4(skb, p);
}

/* A reply from a backend: restore the VIP as its source. */
static __always_inline int reverse_nat4(struct __sk_buff *skb, struct pkt4 *p,
					const struct lb4_config *cfg, __u64 now)
{
	struct ct4_key k = {};
	struct ct4_entry *rev, *fwd;

	if (cfg && cfg->snat_addr && p->daddr == cfg->snat_addr)
		return reverse_snat4(skb, p, now);
	k.saddr = p->saddr;
	k.daddr = p->daddr;
	k.sport = p->sport;
	k.dport = p->dport;
	k.proto = p->proto;
	k.dir = CT_DIR_REVERSE;
	rev = ct4.lookup(&k);
	if (!rev)
		return -1;
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
	if (!fwd || fwd->snat_addr || !reply_of(fwd, p, now))
		return -1;
	if (rewrite4(skb, p, 1, rev->nat_addr, rev->nat_port))
		return TC_ACT_SHOT;
	stat_inc(LB_STAT_RNAT);
	return forward4(skb, p);
}

/* A new flow to frontend svc: choose, masquerade if due, record, translate. */
static __always_inline int new_flow4(struct __sk_buff *skb, struct pkt4 *p,
				     const struct lb_service *svc, int masq,
				     const struct lb4_config *cfg, struct ct4_entry *old,
				     __u64 now)
{
	struct ct4_key k = {};
	struct ct4_entry *ct;
	struct lb4_backend *be;
	__u32 frontend_id = svc->frontend_id;
	__u32 backend_id = 0;
	__be32 snat_addr = 0;
	__be16 snat_port = 0;
	int rc;

	be = lb4_select(svc, &backend_id);
	if (!be) {
		if (svc->flags & LB_SVC_F_DROP_EMPTY) {
			stat_inc(LB_STAT_DROP_NO_LOCAL);
			return TC_ACT_SHOT;
		}
		/* A new connection is refused at once; anything else of a flow
		 * that has no backend any more is dropped. */
		if (p->proto == IPPROTO_UDP || is_new_tcp(p))
			return reject4(skb, p);
		stat_inc(LB_STAT_DROP_NO_BACKEND);
		return TC_ACT_SHOT;
	}
	if (be->addr == p->saddr)
		masq = 1; /* hairpin */
	if (masq && cfg && cfg->snat_addr) {
		if (nat4_bind(p, be, cfg, now, &snat_port)) {
			stat_inc(LB_STAT_NAT_EXHAUSTED);
			return TC_ACT_SHOT;
		}
		snat_addr = cfg->snat_addr;
		stat_inc(LB_STAT_SNAT_NEW);
	}
	/* With no entry yet, insert exclusively: when the first packets of a
	 * flow race on two CPUs, the loser follows the winner's choice. */
	rc = ct4_create(p, be, backend_id, frontend_id, now, old == NULL, snat_addr, snat_port);
	if (rc == CT_LOST_RACE) {
		if (snat_addr)
			nat4_unbind(be, snat_addr, snat_port, p->proto);
		ct4_forward_key(&k, p);
		ct = ct4.lookup(&k);
		if (ct)
			return follow4(skb, p, ct, LB_STAT_DNAT_EST);
	} else if (rc == CT_FAILED) {
		stat_inc(LB_STAT_CT_FULL);
	}
	return translate4(skb, p, be->addr, be->port, snat_addr, snat_port, LB_STAT_DNAT_NEW);
}

int lbctl_tc_ingress(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	struct ct4_key k = {};
	struct ct4_entry *ct;
	struct lb_service *svc = NULL;
	struct lb4_config *cfg;
	__u64 now;
	int rc, masq = 0;

	rc = parse_ipv4(skb, &p);
	if (rc != PARSE_OK) {
		stat_inc(rc == PARSE_FRAGMENT ? LB_STAT_PASS_FRAGMENT : LB_STAT_PASS);
		return TC_ACT_OK;
	}
	now = bpf_ktime_get_ns();
	cfg = lb4_settings();

	ct4_forward_key(&k, &p);
	ct = ct4.lookup(&k);
	if (ct && ct_alive(ct, p.proto, now)) {
		/* An established TCP connection keeps its backend until it ends. */
		if (p.proto == IPPROTO_TCP && !is_new_tcp(&p)) {
			ct_touch(ct, &p, now);
			return follow4(skb, &p, ct, LB_STAT_DNAT_EST);
		}
		/* A SYN on a known tuple is a new connection reusing the port, and
		 * a UDP flow has no end: both keep their backend only while it is
		 * still in the service (kube-proxy likewise flushes the UDP
		 * conntrack of removed endpoints).  The new connection starts
		 * with clean flags; its NAT binding, if any, stays its own. */
		if (lb4_backend_member(ct)) {
			if (is_new_tcp(&p)) {
				ct->flags = 0;
				ct->created_ns = now;
				ct->last_seen_ns = now;
				return follow4(skb, &p, ct, LB_STAT_DNAT_NEW);
			}
			ct_touch(ct, &p, now);
			return follow4(skb, &p, ct, LB_STAT_DNAT_EST);
		}
	}

	rc = lb4_frontend(&p, cfg, &svc, &masq);
	if (rc == FRONTEND_DENIED) {
		stat_inc(LB_STAT_DROP_SOURCE_RANGE);
		return TC_ACT_SHOT;
	}
	if (rc == FRONTEND_OK && svc)
		return new_flow4(skb, &p, svc, masq, cfg, ct, now);

	rc = reverse_nat4(skb, &p, cfg, now);
	if (rc >= 0)
		return rc;
	stat_inc(LB_STAT_PASS);
	return TC_ACT_OK;
}
