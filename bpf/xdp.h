/* Packet parsing and rewriting for XDP (struct xdp_md), by direct access.
 *
 * XDP takes only the plain case: Ethernet, IPv4 without options, not a
 * fragment, the whole TCP or UDP header and the whole IP datagram in the
 * linear buffer.  Everything else is left to tc, which handles it all.
 *
 * XDP has no checksum helpers: checksums are updated by hand (RFC 1624,
 * HC' = ~(~HC + ~m + m') over 16-bit words).  That is right for a packet that
 * carries a full checksum, as one from a real NIC or from a sender with tx
 * checksum offload off does.  A packet from a local stack over veth with
 * offload on carries a partial checksum (only the pseudo-header's sum, to be
 * finished by the device), which XDP cannot tell from a full one: updated
 * this way it is wrong.  docs/datapath.md, "XDP", says where that matters.
 */
#ifndef LBCTL_XDP_H
#define LBCTL_XDP_H

/* The IPv4 header XDP handles: no options. */
#define XDP_IP_HLEN 20

static __always_inline int xdp_parse4(struct xdp_md *ctx, struct pkt4 *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	__be16 *ports = data + ETH_HLEN + XDP_IP_HLEN;
	__u32 tot_len, l4_len;

	if ((void *)(ip + 1) > data_end)
		return PARSE_NOT_OURS;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_OURS;
	if (ip->version != 4 || ip->ihl * 4 != XDP_IP_HLEN)
		return PARSE_NOT_OURS; /* IP options: tc's */
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return PARSE_NOT_OURS;
	if (ip->frag_off & bpf_htons(IP_MF_OFFSET_MASK))
		return PARSE_FRAGMENT;
	l4_len = ip->protocol == IPPROTO_TCP ? sizeof(struct tcphdr) : sizeof(struct udphdr);
	if ((void *)ports + l4_len > data_end)
		return PARSE_NOT_OURS;
	/* The whole datagram must be here: a truncated one, or one whose rest
	 * is in fragments of a multi-buffer frame, is tc's. */
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < XDP_IP_HLEN + l4_len || (void *)ip + tot_len > data_end)
		return PARSE_NOT_OURS;
	p->tcp_flags = 0;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = (void *)ports;

		if ((void *)(th + 1) > data_end)
			return PARSE_NOT_OURS;
		p->tcp_flags = ((__u8 *)th)[13];
	}
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + XDP_IP_HLEN;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->sport = ports[0];
	p->dport = ports[1];
	p->proto = ip->protocol;
	p->tot_len = ip->tot_len;
	p->ttl = ip->ttl;
	p->tos = ip->tos;
	return PARSE_OK;
}

/* One's complement sums of 16-bit words, taken as they lie in memory: the
 * sum is the same in either byte order, so no conversion is needed. */
static __always_inline __u32 csum_delta16(__u32 sum, __be16 from, __be16 to)
{
	return sum + (__u16)~from + (__u16)to;
}

static __always_inline __u32 csum_delta32(__u32 sum, __be32 from, __be32 to)
{
	sum = csum_delta16(sum, (__be16)(from & 0xffff), (__be16)(to & 0xffff));
	return csum_delta16(sum, (__be16)(from >> 16), (__be16)(to >> 16));
}

/* RFC 1624: the checksum check after words m became m', whose differences
 * delta holds.  delta stays far below 2^31, so two folds are enough. */
static __always_inline __u16 csum_update(__u16 check, __u32 delta)
{
	__u32 sum = (__u16)~check + delta;

	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Rewrite the packet parsed into p as x says, decrement its TTL and address
 * it to the next hop the FIB found.  Nothing is written unless everything
 * can be. */
static __always_inline int xdp_rewrite4(struct xdp_md *ctx, const struct pkt4 *p,
					const struct flow4 *x, const struct bpf_fib_lookup *fib)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	__be16 *ports = data + ETH_HLEN + XDP_IP_HLEN;
	__u16 *check;
	__u32 l3 = 0, l4 = 0;
	__be16 old_word, new_word;

	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *th = (void *)ports;

		if ((void *)(th + 1) > data_end)
			return -1;
		check = (__u16 *)&th->check;
	} else {
		struct udphdr *uh = (void *)ports;

		if ((void *)(uh + 1) > data_end)
			return -1;
		check = (__u16 *)&uh->check;
	}
	if (x->snat) {
		l3 = csum_delta32(l3, p->saddr, x->saddr);
		l4 = csum_delta32(l4, p->saddr, x->saddr);
		l4 = csum_delta16(l4, p->sport, x->sport);
		ip->saddr = x->saddr;
		ports[0] = x->sport;
	}
	if (x->dnat) {
		l3 = csum_delta32(l3, p->daddr, x->daddr);
		l4 = csum_delta32(l4, p->daddr, x->daddr);
		l4 = csum_delta16(l4, p->dport, x->dport);
		ip->daddr = x->daddr;
		ports[1] = x->dport;
	}
	/* A router's TTL decrement; TTL and protocol share a 16-bit word. */
	old_word = bpf_htons((__u16)p->ttl << 8 | p->proto);
	new_word = bpf_htons((__u16)(p->ttl - 1) << 8 | p->proto);
	l3 = csum_delta16(l3, old_word, new_word);
	ip->ttl = p->ttl - 1;
	ip->check = csum_update(ip->check, l3);
	if (p->proto == IPPROTO_TCP) {
		*check = csum_update(*check, l4);
	} else if (*check) {
		/* UDP: 0 means "no checksum" and stays 0; a sum that comes out
		 * as 0 is sent as 0xffff, its other one's complement form. */
		__u16 c = csum_update(*check, l4);

		*check = c ? c : 0xffff;
	}
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	return 0;
}

#endif /* LBCTL_XDP_H */
