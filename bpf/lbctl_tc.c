/* lbctl tc programs (clsact, direct action): Service balancing.
 *
 * lbctl_tc_ingress, on the ingress hook of every interface:
 *
 * For every IPv4 TCP/UDP packet (the decisions are flow.h's, shared with XDP):
 *   1. an established flow (forward conntrack hit) is translated as its
 *      first packet was: DNAT to its backend, SNAT when masqueraded;
 *   2. a packet to a service frontend starts a flow: source ranges are
 *      checked, a backend is chosen, masquerading decided (nat.h), conntrack
 *      remembers it all, and the packet is translated; a frontend without
 *      backends rejects it (TCP reset, ICMP unreachable), or drops it when
 *      its backends are only on other nodes (externalTrafficPolicy Local);
 *   3. a reply from a backend (reverse conntrack or NAT hit, confirmed by
 *      its forward twin) is translated back so the client sees the VIP;
 *   4. an ICMP error about a balanced flow is translated like the flow
 *      (icmp.h), so path MTU discovery works through the balancer;
 *   5. everything else passes untouched; a client's packet straight to a
 *      backend may first take over the reply tuple of a balanced flow of
 *      the same client port (flow.h: tuple clashes).
 * With the XDP fast path on, packets XDP could not finish arrive here
 * untouched and are decided afresh (a flow XDP recorded is followed).
 *
 * lbctl_tc_egress, on the egress hook of the same interfaces: the replies
 * the node's own stack sends, which no ingress hook sees.  A flow to an
 * address of this node (a hostNetwork endpoint) is delivered to the stack
 * after ingress DNAT; its reply (and an ICMP error about it) leaves out of
 * the interface towards the client, and gets the Service's address back
 * here, after netfilter, which saw both directions untranslated.  Packets
 * that were received on some interface (forwarded, bridged, redirected:
 * pod to pod) passed an ingress hook already and leave at once.
 */

/* Rewrite p as x says (a reply's source first) and count it; -1 on failure. */
static __always_inline int tc_rewrite4(struct __sk_buff *skb, struct pkt4 *p,
				       const struct flow4 *x)
{
	if (x->reply) {
		if (x->snat && rewrite4(skb, p, 1, x->saddr, x->sport))
			return -1;
		if (x->dnat && rewrite4(skb, p, 0, x->daddr, x->dport))
			return -1;
	} else {
		if (x->dnat && rewrite4(skb, p, 0, x->daddr, x->dport))
			return -1;
		if (x->snat && rewrite4(skb, p, 1, x->saddr, x->sport))
			return -1;
	}
	stat_inc(x->stat);
	fe_stat(x->frontend_id, x->stat, bpf_ntohs(p->tot_len));
	return 0;
}

/* Rewrite p as x says, count it, forward it. */
static __always_inline int tc_translate4(struct __sk_buff *skb, struct pkt4 *p,
					 const struct flow4 *x)
{
	if (tc_rewrite4(skb, p, x))
		return TC_ACT_SHOT;
	return forward4(skb, p);
}

int lbctl_tc_ingress(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	struct flow4 x = {};
	struct lb4_config *cfg;
	__u64 now;
	int rc;

	now = bpf_ktime_get_ns();
	cfg = lb4_settings();
	rc = parse_ipv4(skb, &p);
	if (rc != PARSE_OK) {
		if (rc == PARSE_NOT_OURS) {
			rc = icmp4_error(skb, cfg, now, 0);
			if (rc >= 0)
				return rc;
		}
		stat_inc(rc == PARSE_FRAGMENT ? LB_STAT_PASS_FRAGMENT : LB_STAT_PASS);
		return TC_ACT_OK;
	}

	rc = flow4_decide(&p, cfg, now, &x, 1);
	if (rc == FLOW_RETIRE)
		flow4_retire(&x);
	if (rc == FLOW_PASS || rc == FLOW_RETIRE) {
		stat_inc(LB_STAT_PASS);
		return TC_ACT_OK;
	}
	if (rc == FLOW_REJECT) {
		fe_stat(x.frontend_id, LB_STAT_REJECT, 0);
		event_drop(LB_HOOK_TC_INGRESS, now, &p, &x);
		return reject4(skb, &p);
	}
	rc = flow4_commit(&p, cfg, now, rc, &x);
	if (rc == FLOW_DROP) {
		stat_inc(x.stat);
		fe_stat(x.frontend_id, x.stat, 0);
		event_drop(LB_HOOK_TC_INGRESS, now, &p, &x);
		return TC_ACT_SHOT;
	}
	if (rc == FLOW_PASS) {
		stat_inc(LB_STAT_PASS);
		return TC_ACT_OK;
	}
	if (x.stat == LB_STAT_DNAT_NEW)
		event_new(LB_HOOK_TC_INGRESS, now, &p, &x);
	return tc_translate4(skb, &p, &x);
}

int lbctl_tc_egress(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	struct flow4 x = {};
	struct lb4_config *cfg;
	__u64 now;
	int rc;

	/* Received on an interface (forwarded, bridged, redirected by the
	 * ingress program): not the node's own, and its ingress hook saw it.
	 * The common pod -> pod packet costs this one test. */
	if (skb->ingress_ifindex)
		return TC_ACT_OK;
	now = bpf_ktime_get_ns();
	cfg = lb4_settings();
	rc = parse_ipv4(skb, &p);
	if (rc != PARSE_OK) {
		if (rc == PARSE_NOT_OURS) {
			rc = icmp4_error(skb, cfg, now, 1);
			if (rc >= 0)
				return rc;
		}
		return TC_ACT_OK;
	}
	/* Only replies: a packet the node's stack starts is its own (its
	 * sockets reach Services through the socket hooks). */
	if (flow4_reply(&p, cfg, now, &x, 0) != FLOW_REPLY)
		return TC_ACT_OK;
	if (flow4_commit(&p, cfg, now, FLOW_REPLY, &x) != FLOW_REPLY)
		return TC_ACT_OK;
	if (tc_rewrite4(skb, &p, &x))
		return TC_ACT_SHOT;
	stat_inc(LB_STAT_EGRESS_RNAT);
	return TC_ACT_OK;
}
