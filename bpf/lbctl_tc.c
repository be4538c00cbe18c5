/* lbctl tc program (clsact ingress, direct action): Service balancing.
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
 */

/* Rewrite p as x says (a reply's source first), count it, forward it. */
static __always_inline int tc_translate4(struct __sk_buff *skb, struct pkt4 *p,
					 const struct flow4 *x)
{
	if (x->reply) {
		if (x->snat && rewrite4(skb, p, 1, x->saddr, x->sport))
			return TC_ACT_SHOT;
		if (x->dnat && rewrite4(skb, p, 0, x->daddr, x->dport))
			return TC_ACT_SHOT;
	} else {
		if (x->dnat && rewrite4(skb, p, 0, x->daddr, x->dport))
			return TC_ACT_SHOT;
		if (x->snat && rewrite4(skb, p, 1, x->saddr, x->sport))
			return TC_ACT_SHOT;
	}
	stat_inc(x->stat);
	fe_stat(x->frontend_id, x->stat, bpf_ntohs(p->tot_len));
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
			rc = icmp4_error(skb, cfg, now);
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
		return reject4(skb, &p);
	}
	rc = flow4_commit(&p, cfg, now, rc, &x);
	if (rc == FLOW_DROP) {
		stat_inc(x.stat);
		fe_stat(x.frontend_id, x.stat, 0);
		return TC_ACT_SHOT;
	}
	if (rc == FLOW_PASS) {
		stat_inc(LB_STAT_PASS);
		return TC_ACT_OK;
	}
	return tc_translate4(skb, &p, &x);
}
