/* ICMP errors about balanced flows.
 *
 * An ICMP error (destination unreachable, fragmentation needed, time
 * exceeded, parameter problem) quotes the IP header and first 8 bytes of
 * the packet that caused it (RFC 792).  When that packet was one we
 * translated, the error goes to an address the sender never used, quoting
 * addresses it never sent; netfilter's NAT translates such "related"
 * errors, and path MTU discovery depends on it.  Two directions:
 *
 *   about a forward packet (client -> backend, maybe masqueraded), from the
 *   backend or a router on the way: the quote becomes client -> VIP, the
 *   error goes to the client (not the masquerade address), and an error
 *   from the backend itself comes from the VIP;
 *   about a reply (VIP -> client), from the client's side: the quote
 *   becomes backend -> client (-> NAT address when masqueraded) and the
 *   error goes to the backend.
 *
 * The quoted IP and UDP checksums and the ICMP checksum are kept right.
 * Conntrack is not refreshed: an error is no traffic of the flow.
 */
#ifndef LBCTL_ICMP_H
#define LBCTL_ICMP_H

struct icmp4_quote {
	struct iphdr ip;
	__be16 sport;
	__be16 dport;
	__be16 w2;    /* UDP: length; TCP: sequence number, high half */
	__be16 check; /* UDP: checksum; TCP: sequence number, low half */
};

struct icmp4_rewrite {
	__be32 outer_saddr;
	__be32 outer_daddr;
	__u32 frontend_id; /* the flow's, for the event stream */
	__u32 backend_id;
	struct icmp4_quote q;
};

static __always_inline __u16 csum_fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

static __always_inline void ip_csum_fill(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 s = 0;
	int i;

	ip->check = 0;
#pragma unroll
	for (i = 0; i < 10; i++)
		s += w[i];
	ip->check = ~csum_fold(s);
}

/* Point the quote (and the outer header) where the flow's sender sees it,
 * with the decisions tc takes for the flow's own packets (flow.h).  On the
 * egress hook (`egress`) only errors about a packet sent to a backend: the
 * node's stack (a backend on this node, or a router on the way) routed them
 * to the client already.  One about a reply it received was routed towards
 * the VIP, out of an interface that may not lead to the backend. */
static __always_inline int icmp4_translate(const struct lb4_config *cfg, __u64 now,
					   struct icmp4_rewrite *r, int egress)
{
	struct icmp4_quote *q = &r->q;
	struct ct4_key k = {};
	struct ct4_entry *fwd;
	struct pkt4 p = {};
	struct flow4 x = {};

	/* The quoted packet's answer: the packet that would come back. */
	p.saddr = q->ip.daddr;
	p.daddr = q->ip.saddr;
	p.sport = q->dport;
	p.dport = q->sport;
	p.proto = q->ip.protocol;
	if (flow4_reply(&p, cfg, now, &x, 0) == FLOW_REPLY) {
		/* The quote is a packet we sent to a backend, p its reply, and x
		 * that reply as the client gets it.  An error from the backend
		 * itself comes from the service. */
		if (r->outer_saddr == p.saddr)
			r->outer_saddr = x.saddr;
	} else if (egress) {
		return 0;
	} else {
		/* The quote is a reply we sent to a client, p the client's packet
		 * of the flow, and x that packet as the backend got it. */
		ct4_forward_key(&k, &p);
		fwd = ct4.lookup(&k);
		if (!fwd || !ct_alive(fwd, p.proto, now))
			return 0;
		flow4_follow(&p, fwd, &x, FLOW_FOLLOW, LB_STAT_ICMP_ERROR);
	}
	/* Either way the quote is x reversed, and the error goes to whoever
	 * sent what x answers. */
	q->ip.saddr = x.daddr;
	q->sport = x.dport;
	q->ip.daddr = x.saddr;
	q->dport = x.sport;
	r->outer_daddr = x.daddr;
	r->frontend_id = x.frontend_id;
	r->backend_id = x.ct ? x.ct->backend_id : 0; /* the flow's forward entry */
	return 1;
}

/* An ICMP error about a balanced flow, translated and forwarded (on the
 * egress hook, `egress`: translated and left on its way); -1 when the packet
 * is not one (the caller passes it). */
static __always_inline int icmp4_error(struct __sk_buff *skb, const struct lb4_config *cfg,
				       __u64 now, int egress)
{
	struct iphdr ip;
	struct icmphdr icmp;
	struct icmp4_rewrite r = {};
	struct icmp4_quote old;
	struct pkt4 p = {};
	__u32 l3 = ETH_HLEN, icmp_off, quote_off, csum_off;
	__s64 diff;
	__be32 words[6];
	__be16 h_proto;
	__u16 c;

	/* Only an IPv4 frame: an ARP, IPv6 or tagged frame whose bytes happen to
	 * read as an ICMP error about a balanced flow is not one. */
	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &h_proto,
			       sizeof(h_proto)) ||
	    h_proto != bpf_htons(ETH_P_IP))
		return -1;
	if (bpf_skb_load_bytes(skb, l3, &ip, sizeof(ip)))
		return -1;
	if (ip.version != 4 || ip.ihl != 5 || ip.protocol != IPPROTO_ICMP ||
	    (ip.frag_off & bpf_htons(IP_MF_OFFSET_MASK)))
		return -1;
	/* The quote must be inside the datagram, not in bytes after its end. */
	if (bpf_ntohs(ip.tot_len) < sizeof(ip) + sizeof(icmp) + sizeof(r.q))
		return -1;
	icmp_off = l3 + sizeof(ip);
	if (bpf_skb_load_bytes(skb, icmp_off, &icmp, sizeof(icmp)))
		return -1;
	if (icmp.type != ICMP_DEST_UNREACH && icmp.type != ICMP_TIME_EXCEEDED &&
	    icmp.type != ICMP_PARAMETERPROB)
		return -1;
	quote_off = icmp_off + sizeof(icmp);
	if (bpf_skb_load_bytes(skb, quote_off, &r.q, sizeof(r.q)))
		return -1;
	if (r.q.ip.version != 4 || r.q.ip.ihl != 5 ||
	    (r.q.ip.protocol != IPPROTO_TCP && r.q.ip.protocol != IPPROTO_UDP))
		return -1;
	old = r.q;
	r.outer_saddr = ip.saddr;
	r.outer_daddr = ip.daddr;
	if (!icmp4_translate(cfg, now, &r, egress))
		return -1;

	/* The quoted UDP checksum (0: none) follows its pseudo-header and ports. */
	if (r.q.ip.protocol == IPPROTO_UDP && old.check) {
		words[0] = old.ip.saddr;
		words[1] = old.ip.daddr;
		words[2] = ((__u32)old.dport << 16) | old.sport;
		words[3] = r.q.ip.saddr;
		words[4] = r.q.ip.daddr;
		words[5] = ((__u32)r.q.dport << 16) | r.q.sport;
		diff = bpf_csum_diff(&words[0], 12, &words[3], 12, (__u16)~old.check);
		if (diff < 0)
			return TC_ACT_SHOT;
		c = ~csum_fold((__u32)diff);
		r.q.check = c ? c : 0xffff;
	}
	ip_csum_fill(&r.q.ip);
	/* The ICMP checksum covers the quote (and no pseudo-header). */
	diff = bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)&r.q, sizeof(r.q), 0);
	if (diff < 0)
		return TC_ACT_SHOT;
	csum_off = icmp_off + offsetof(struct icmphdr, checksum);
	if (bpf_l4_csum_replace(skb, csum_off, 0, (__u32)diff, 0))
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, quote_off, &r.q, sizeof(r.q), 0))
		return TC_ACT_SHOT;
	if (r.outer_saddr != ip.saddr &&
	    (bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), ip.saddr,
				 r.outer_saddr, sizeof(__be32)) ||
	     bpf_skb_store_bytes(skb, l3 + offsetof(struct iphdr, saddr), &r.outer_saddr,
				 sizeof(__be32), 0)))
		return TC_ACT_SHOT;
	if (r.outer_daddr != ip.daddr &&
	    (bpf_l3_csum_replace(skb, l3 + offsetof(struct iphdr, check), ip.daddr,
				 r.outer_daddr, sizeof(__be32)) ||
	     bpf_skb_store_bytes(skb, l3 + offsetof(struct iphdr, daddr), &r.outer_daddr,
				 sizeof(__be32), 0)))
		return TC_ACT_SHOT;
	stat_inc(LB_STAT_ICMP_ERROR);
	if (lb_watched(now) & (1U << LB_EV_ICMP)) {
		struct lb_event ev = {};

		ev.ts_ns = now;
		ev.type = LB_EV_ICMP;
		ev.reason = LB_STAT_ICMP_ERROR;
		ev.proto = r.q.ip.protocol;
		ev.hook = egress ? LB_HOOK_TC_EGRESS : LB_HOOK_TC_INGRESS;
		ev.frontend_id = r.frontend_id;
		ev.backend_id = r.backend_id;
		ev.saddr = ip.saddr; /* the error as it came: no ports */
		ev.daddr = ip.daddr;
		ev.nat_addr = r.outer_daddr;
		lb_events.ringbuf_output(&ev, sizeof(ev), 0);
	}
	if (egress) {
		stat_inc(LB_STAT_EGRESS_RNAT);
		return TC_ACT_OK;
	}
	p.l3_off = l3;
	p.saddr = r.outer_saddr;
	p.daddr = r.outer_daddr;
	p.proto = IPPROTO_ICMP;
	p.ttl = ip.ttl;
	p.tos = ip.tos;
	return forward4(skb, &p);
}

#endif /* LBCTL_ICMP_H */
