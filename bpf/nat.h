/* Masquerade: which new flows are source-NATed, and their NAT ports.
 *
 * kube-proxy's rules, restated (its KUBE-MARK-MASQ decisions):
 *   - a ClusterIP masquerades clients from outside the cluster CIDRs, and
 *     every client with masqueradeAll;
 *   - a NodePort, LoadBalancer IP or externalIP masquerades everyone, except
 *     with externalTrafficPolicy Local, which masquerades no one: pods keep
 *     every endpoint, outside clients get this node's endpoints only.
 *     masqueradeAll does not change that: kube-proxy adds its rule for the
 *     ClusterIP only, and the policy guarantees the client's address;
 *   - a pod that lands on itself (hairpin) is always masqueraded, or its
 *     reply would go straight back to itself.
 * And what the node's netfilter would do after kube-proxy, which lbctl's
 * redirect bypasses (the backend's flags, set by the agent, say where it is):
 *   - a pod's flow to an endpoint outside the pod network is masqueraded,
 *     as the CNI's masquerade rule would (LB_BACKEND_F_MASQ_PODS);
 *   - a flow to an address of this node is never masqueraded: it is
 *     delivered to the node's own stack, which never masquerades an input
 *     packet (LB_BACKEND_F_HOST; the egress hook translates the replies).
 * Masqueraded flows leave with the node's address and a port from the NAT
 * range, chosen here and recorded in nat4.
 */
#ifndef LBCTL_NAT_H
#define LBCTL_NAT_H

#define NAT_TRIES 32 /* ports tried before a new flow counts as exhausted */

/* A pod of the cluster, as the cluster CIDRs tell (kube-proxy's local
 * traffic detector).  Without CIDRs, nobody is. */
static __always_inline int lb4_internal(const struct lb4_config *cfg, __be32 saddr)
{
	struct lb4_cidr_key k = {};

	if (!cfg || !(cfg->flags & LB_CFG_F_DETECTOR))
		return 0;
	k.prefixlen = 32;
	k.addr = saddr;
	return lb4_cluster_cidrs.lookup(&k) != NULL;
}

/* Does loadBalancerSourceRanges let this client in? */
static __always_inline int lb4_source_allowed(const struct pkt4 *p)
{
	struct lb4_range_key k = {};

	k.prefixlen = 64 + 32;
	k.vip = p->daddr;
	k.port = p->dport;
	k.proto = p->proto;
	k.saddr = p->saddr;
	return lb4_source_ranges.lookup(&k) != NULL;
}

#define FRONTEND_NONE 0
#define FRONTEND_OK 1
#define FRONTEND_DENIED 2 /* outside loadBalancerSourceRanges */

/* The frontend entry a new flow uses, and whether it is masqueraded (before
 * the backend has its say, masq4_backend()).  *internal: whether the client
 * is a pod, when this had to find out (else left at -1). */
static __always_inline int lb4_frontend(const struct pkt4 *p, const struct lb4_config *cfg,
					struct lb_service **out, int *masq, int *internal)
{
	struct lb_service *svc = lb4_lookup(p, LB_SCOPE_ALL);
	__u16 flags;

	if (!svc)
		return FRONTEND_NONE;
	flags = svc->flags;
	if ((flags & LB_SVC_F_SOURCE_RANGES) && !lb4_source_allowed(p)) {
		*out = svc; /* whose counters count the drop */
		return FRONTEND_DENIED;
	}
	*masq = 0;
	if (flags & LB_SVC_F_CLUSTER_IP) {
		if (cfg && (cfg->flags & LB_CFG_F_MASQ_ALL)) {
			*masq = 1;
		} else if (cfg && (cfg->flags & LB_CFG_F_DETECTOR)) {
			*internal = lb4_internal(cfg, p->saddr);
			*masq = !*internal;
		}
	} else if (flags & LB_SVC_F_EXTERNAL) {
		if (!(flags & LB_SVC_F_LOCAL)) {
			*masq = 1;
		} else {
			*internal = lb4_internal(cfg, p->saddr);
			if (!*internal)
				svc = lb4_lookup(p, LB_SCOPE_EXTERNAL);
		}
	}
	*out = svc;
	return svc ? FRONTEND_OK : FRONTEND_NONE;
}

/* The backend's say in masquerading a new flow of client p (see the rules
 * above): masq as the frontend decided, internal as lb4_frontend() found it
 * (-1: not looked up; the common pod -> pod flow never needs it here). */
static __always_inline int masq4_backend(const struct pkt4 *p, const struct lb4_config *cfg,
					 const struct lb4_backend *be, int masq, int internal)
{
	if (be->flags & LB_BACKEND_F_HOST)
		return 0;
	if (be->addr == p->saddr)
		return 1; /* hairpin */
	if (masq || !(be->flags & LB_BACKEND_F_MASQ_PODS))
		return masq;
	return internal < 0 ? lb4_internal(cfg, p->saddr) : internal;
}

static __always_inline void nat4_key(struct ct4_key *k, __be32 be_addr, __be16 be_port,
				     __be32 snat_addr, __be16 snat_port, __u8 proto)
{
	k->saddr = be_addr;
	k->daddr = snat_addr;
	k->sport = be_port;
	k->dport = snat_port;
	k->proto = proto;
	k->dir = CT_DIR_REVERSE;
	k->pad = 0;
}

/* The forward entry of the flow that took a NAT binding, if it is there. */
static __always_inline struct ct4_entry *nat4_forward(const struct nat4_entry *e, __u8 proto)
{
	struct ct4_key k = {};

	k.saddr = e->client_addr;
	k.daddr = e->vip;
	k.sport = e->client_port;
	k.dport = e->vport;
	k.proto = proto;
	k.dir = CT_DIR_FORWARD;
	return ct4.lookup(&k);
}

/* A binding is free for a new flow when the flow that took it is gone:
 * its forward entry is missing, names another binding, or has expired; or
 * it has closed both ways, the client first (or by a RST): then the backend
 * holds nothing of the tuple once its passive close has ended with the
 * client's last ACK, and the client's TIME_WAIT is on its own side of the
 * NAT.  When that last ACK (or the RST) has passed here (CT_DONE_ACKED), the
 * binding is free after LBCTL_NAT_REUSE_ACKED_NS, time for the ACK to land
 * before a new SYN on another CPU could overtake it; otherwise after
 * LBCTL_NAT_REUSE_NS of quiet, time for a lost ACK's retransmission.  Without
 * this the range holds every closed flow for the closing timeout, and a busy
 * NodePort runs out at range / timeout new flows a second per backend (with
 * the quiet second alone, at range new flows a second).  A backend that
 * closed first keeps the tuple in TIME_WAIT, where a new SYN may be refused:
 * that binding waits for the closing timeout. */
static __always_inline int nat4_stale(const struct nat4_entry *e, const struct ct4_key *nk,
				      __u64 now)
{
	struct ct4_entry *fwd = nat4_forward(e, nk->proto);

	if (!fwd || fwd->snat_addr != nk->daddr || fwd->snat_port != nk->dport ||
	    fwd->nat_addr != nk->saddr || fwd->nat_port != nk->sport)
		return 1;
	if (!ct_alive(fwd, nk->proto, now))
		return 1;
	if (nk->proto != IPPROTO_TCP ||
	    (fwd->flags & (CT_F_CLOSED | CT_F_REPLY_CLOSED_FIRST)) != CT_F_CLOSED)
		return 0;
	return age_ns(now, fwd->last_seen_ns) >
	       (fwd->done ? LBCTL_NAT_REUSE_ACKED_NS : LBCTL_NAT_REUSE_NS);
}

/* Does the flow ct of client packet p still hold its NAT binding?  A flow
 * closed both ways may have lost it to a new flow (nat4_stale); a SYN
 * reusing its tuple then starts afresh instead of restarting on it. */
static __always_inline int nat4_held(const struct ct4_entry *ct, const struct pkt4 *p)
{
	struct ct4_key k = {};
	struct nat4_entry *nat;

	if (!ct->snat_addr || (ct->flags & CT_F_CLOSED) != CT_F_CLOSED)
		return 1;
	nat4_key(&k, ct->nat_addr, ct->nat_port, ct->snat_addr, ct->snat_port, p->proto);
	nat = nat4.lookup(&k);
	return nat && nat->client_addr == p->saddr && nat->client_port == p->sport &&
	       nat->vip == p->daddr && nat->vport == p->dport;
}

/* Take a NAT port for the new flow p -> be: a random port per try, so the
 * range fills evenly and a nearly full range still finds its free ports
 * (probing the next ports in turn would walk along the runs of taken ports
 * that random fill makes).  A range no bigger than NAT_TRIES is tried whole,
 * in turn from a random start.  Two CPUs reclaiming the same stale binding
 * at once is possible but harmless beyond those two flows: the later write
 * wins. */
static __always_inline int nat4_bind(const struct pkt4 *p, const struct lb4_backend *be,
				     const struct lb4_config *cfg, __u64 now, __be16 *port)
{
	struct ct4_key k = {};
	struct nat4_entry e = {};
	__u32 min = cfg->nat_port_min, max = cfg->nat_port_max;
	__u32 range, start, i;

	if (min == 0 || max < min)
		return -1;
	range = max - min + 1;
	start = bpf_get_prandom_u32() % range;
	e.created_ns = now;
	e.client_addr = p->saddr;
	e.client_port = p->sport;
	e.vip = p->daddr;
	e.vport = p->dport;
	nat4_key(&k, be->addr, be->port, cfg->snat_addr, 0, p->proto);
	for (i = 0; i < NAT_TRIES; i++) {
		struct nat4_entry *old;
		__u32 n = range <= NAT_TRIES ? (start + i) % range : bpf_get_prandom_u32() % range;

		k.dport = bpf_htons((__u16)(min + n));
		if (nat4.insert(&k, &e) == 0) {
			*port = k.dport;
			return 0;
		}
		old = nat4.lookup(&k);
		if (old && nat4_stale(old, &k, now) && nat4.update(&k, &e) == 0) {
			*port = k.dport;
			return 0;
		}
	}
	return -1;
}

static __always_inline void nat4_unbind(const struct lb4_backend *be, __be32 snat_addr,
					__be16 snat_port, __u8 proto)
{
	struct ct4_key k = {};

	nat4_key(&k, be->addr, be->port, snat_addr, snat_port, proto);
	nat4.delete(&k);
}

#endif /* LBCTL_NAT_H */
