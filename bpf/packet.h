/* Packet parsing and header rewriting for tc (struct __sk_buff).
 *
 * Headers are read with bpf_skb_load_bytes, so non-linear skbs parse like
 * linear ones and every read is bounds-checked by the helper itself.
 */
#ifndef LBCTL_PACKET_H
#define LBCTL_PACKET_H

#define IP_MF_OFFSET_MASK 0x3fff /* MF flag and fragment offset */

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_OURS = 1, /* not IPv4 TCP/UDP, or truncated: pass it */
	PARSE_FRAGMENT = 2,
};

struct pkt4 {
	__u32 l3_off;
	__u32 l4_off;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__be16 tot_len;
	__u8 proto;
	__u8 tcp_flags;
	__u8 ttl;
	__u8 tos;
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt4 *p)
{
	struct iphdr ip;
	__be16 proto;
	__be16 ports[2];

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &proto,
			       sizeof(proto)))
		return PARSE_NOT_OURS;
	if (proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_OURS;
	p->l3_off = ETH_HLEN;
	if (bpf_skb_load_bytes(skb, p->l3_off, &ip, sizeof(ip)))
		return PARSE_NOT_OURS;
	if (ip.version != 4 || ip.ihl < 5)
		return PARSE_NOT_OURS;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return PARSE_NOT_OURS;
	if (ip.frag_off & bpf_htons(IP_MF_OFFSET_MASK))
		return PARSE_FRAGMENT;
	p->l4_off = p->l3_off + ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)))
		return PARSE_NOT_OURS;
	p->tcp_flags = 0;
	if (ip.protocol == IPPROTO_TCP) {
		/* The whole TCP header must be there before we touch its checksum. */
		struct tcphdr th;

		if (bpf_skb_load_bytes(skb, p->l4_off, &th, sizeof(th)))
			return PARSE_NOT_OURS;
		p->tcp_flags = ((__u8 *)&th)[13];
	} else {
		struct udphdr uh;

		if (bpf_skb_load_bytes(skb, p->l4_off, &uh, sizeof(uh)))
			return PARSE_NOT_OURS;
	}
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->sport = ports[0];
	p->dport = ports[1];
	p->proto = ip.protocol;
	p->tot_len = ip.tot_len;
	p->ttl = ip.ttl;
	p->tos = ip.tos;
	return PARSE_OK;
}

static __always_inline __u32 l4_csum_off(const struct pkt4 *p)
{
	if (p->proto == IPPROTO_TCP)
		return p->l4_off + offsetof(struct tcphdr, check);
	return p->l4_off + offsetof(struct udphdr, check);
}

/* Rewrite the source (snat != 0) or destination address and port, keeping
 * the IP checksum and the L4 checksum (pseudo-header included) right for
 * full and partial (offloaded) checksums alike.  A UDP checksum of zero
 * means "none" and stays zero. */
static __always_inline int rewrite4(struct __sk_buff *skb, struct pkt4 *p,
				    int snat, __be32 addr, __be16 port)
{
	__u32 csum_off = l4_csum_off(p);
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be32 old_addr = snat ? p->saddr : p->daddr;
	__be16 old_port = snat ? p->sport : p->dport;
	__u32 addr_off = p->l3_off + (snat ? offsetof(struct iphdr, saddr)
					   : offsetof(struct iphdr, daddr));
	__u32 port_off = p->l4_off + (snat ? 0 : 2);

	if (bpf_l4_csum_replace(skb, csum_off, old_addr, addr,
				BPF_F_PSEUDO_HDR | mangled | sizeof(addr)))
		return -1;
	if (old_port != port &&
	    bpf_l4_csum_replace(skb, csum_off, old_port, port,
				mangled | sizeof(port)))
		return -1;
	if (bpf_l3_csum_replace(skb, p->l3_off + offsetof(struct iphdr, check),
				old_addr, addr, sizeof(addr)))
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &addr, sizeof(addr), 0))
		return -1;
	if (bpf_skb_store_bytes(skb, port_off, &port, sizeof(port), 0))
		return -1;
	if (snat) {
		p->saddr = addr;
		p->sport = port;
	} else {
		p->daddr = addr;
		p->dport = port;
	}
	return 0;
}

#endif /* LBCTL_PACKET_H */
