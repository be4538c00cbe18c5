/* lbctl XDP program: the fast path for traffic from outside the node.
 *
 * Attached to the external interfaces (lbctl run --xdp), before the kernel
 * allocates an skb.  It takes the decisions tc takes (flow.h: conntrack,
 * frontend, source ranges, backend choice, masquerade, replies) and records
 * them as tc does, then asks the FIB where the translated packet goes,
 * before touching it:
 *   - the FIB knows the next hop and its MAC: the packet is rewritten
 *     (addresses, ports, checksums, TTL, MACs) and redirected out of that
 *     interface;
 *   - anything else (no neighbour yet, a local destination, TTL <= 1, a
 *     packet bigger than the route's MTU, forwarding off): XDP_PASS with the
 *     packet untouched; the tc program on the same interface does the whole
 *     job, following the flow recorded here;
 *   - a reject to send, IP options, fragments, non-IPv4, non-TCP/UDP:
 *     XDP_PASS before any decision, tc decides;
 *   - drops tc would make too (outside loadBalancerSourceRanges, no local
 *     endpoint, a later packet of a flow without backends, no NAT port):
 *     XDP_DROP, counted as tc counts them.
 */

/* Leave p to tc.  A new flow recorded here is counted by whoever translates
 * its first packet (CT_F_UNCOUNTED), so no flow counts twice or never. */
static __always_inline int xdp_to_tc(const struct pkt4 *p, int verdict)
{
	if (verdict == FLOW_NEW) {
		struct ct4_key k = {};
		struct ct4_entry *ct;

		ct4_forward_key(&k, p);
		ct = ct4.lookup(&k);
		if (ct)
			ct->flags |= CT_F_UNCOUNTED;
	}
	stat_inc(LB_STAT_XDP_TO_TC);
	return XDP_PASS;
}

int lbctl_xdp(struct xdp_md *ctx)
{
	struct pkt4 p = {};
	struct flow4 x = {};
	struct bpf_fib_lookup fib = {};
	struct lb4_config *cfg;
	__u64 now;
	int rc;

	if (xdp_parse4(ctx, &p) != PARSE_OK) {
		stat_inc(LB_STAT_XDP_PASS);
		return XDP_PASS;
	}
	now = bpf_ktime_get_ns();
	cfg = lb4_settings();

	/* Without the direct-flow check (0), a packet that may take over a
	 * balanced flow's reply tuple is FLOW_PASS here: tc decides it afresh
	 * and retires (flow.h: tuple clashes). */
	rc = flow4_decide(&p, cfg, now, &x, 0);
	if (rc == FLOW_PASS) {
		stat_inc(LB_STAT_XDP_PASS);
		return XDP_PASS;
	}
	if (rc == FLOW_REJECT)
		return xdp_to_tc(&p, rc); /* tc answers */
	if (rc != FLOW_DROP)
		rc = flow4_commit(&p, cfg, now, rc, &x);
	if (rc == FLOW_DROP) {
		stat_inc(x.stat);
		fe_stat(x.frontend_id, x.stat, 0);
		event_drop(LB_HOOK_XDP, now, &p, &x);
		return XDP_DROP;
	}
	if (rc == FLOW_PASS)
		return xdp_to_tc(&p, rc);
	if (p.ttl <= 1)
		return xdp_to_tc(&p, rc); /* the stack sends time exceeded */

	/* Where does the translated packet go?  The tot_len makes the kernel
	 * check it against the route's MTU. */
	fib.family = AF_INET;
	fib.tos = p.tos;
	fib.l4_protocol = p.proto;
	fib.sport = x.sport;
	fib.dport = x.dport;
	fib.tot_len = bpf_ntohs(p.tot_len);
	fib.ipv4_src = x.saddr;
	fib.ipv4_dst = x.daddr;
	fib.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return xdp_to_tc(&p, rc);
	if (xdp_rewrite4(ctx, &p, &x, &fib))
		return xdp_to_tc(&p, rc);
	stat_inc(x.stat);
	fe_stat(x.frontend_id, x.stat, bpf_ntohs(p.tot_len));
	stat_inc(LB_STAT_XDP_REDIRECT);
	return bpf_redirect(fib.ifindex, 0);
}
