/* After NAT: hand the packet straight to the egress device.
 *
 * bpf_fib_lookup + bpf_redirect_neigh forwards without the stack, so
 * rp_filter never sees a reverse-NATed source and netfilter conntrack in the
 * node never sees half a translated flow (see docs/datapath.md).  Whatever
 * the FIB cannot forward (local destinations, forwarding off, TTL expiring)
 * goes to the stack unchanged apart from the NAT.
 */
#ifndef LBCTL_FORWARD_H
#define LBCTL_FORWARD_H

/* bcc 0.26 declares this helper with three arguments; the kernel takes four. */
#define lbctl_redirect_neigh(ifindex, params, plen, flags)                          \
	((long (*)(__u32, struct bpf_redir_neigh *, int, __u64))BPF_FUNC_redirect_neigh)( \
		ifindex, params, plen, flags)

static __always_inline int forward4(struct __sk_buff *skb, const struct pkt4 *p)
{
#if LBCTL_FIB_REDIRECT
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	__be16 old_word, new_word;
	int rc;

	fib.family = AF_INET;
	fib.tos = p->tos;
	fib.l4_protocol = p->proto;
	fib.sport = p->sport;
	fib.dport = p->dport;
	/* tot_len stays 0: a non-zero one makes the kernel compare it with the
	 * route MTU and refuse GSO packets (veth carries 64 KB TSO frames); with
	 * 0 it checks forwardability the way the stack does. */
	fib.ipv4_src = p->saddr;
	fib.ipv4_dst = p->daddr;
	fib.ifindex = skb->ingress_ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return TC_ACT_OK;
	if (p->ttl <= 1)
		return TC_ACT_OK; /* the stack sends the ICMP time exceeded */
	/* Decrement TTL as a router does; TTL and protocol share a 16-bit word. */
	old_word = bpf_htons((__u16)p->ttl << 8 | p->proto);
	new_word = bpf_htons((__u16)(p->ttl - 1) << 8 | p->proto);
	if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check),
				old_word, new_word, sizeof(new_word)))
		return TC_ACT_OK;
	if (bpf_skb_store_bytes(skb, p->l3_off + offsetof(struct iphdr, ttl),
				&new_word, sizeof(new_word), 0))
		return TC_ACT_OK;
	nh.nh_family = AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;
	stat_inc(LB_STAT_REDIRECT);
	return lbctl_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
#else
	return TC_ACT_OK;
#endif
}

#endif /* LBCTL_FORWARD_H */
