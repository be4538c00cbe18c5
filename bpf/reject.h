/* Rejecting a new flow to a service that has no usable backend, as
 * kube-proxy's REJECT rules do: a TCP reset for TCP, an ICMP port
 * unreachable for UDP, sent back out of the interface the packet came in
 * on, so the client fails at once instead of waiting for a timeout.
 *
 * The answer is built in place: the frame is cut to the answer's size and
 * every header written whole, with checksums computed from scratch.
 */
#ifndef LBCTL_REJECT_H
#define LBCTL_REJECT_H

#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3
#define REJECT_TTL 64

struct pseudo4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

static __always_inline __u16 csum_fold32(__s64 sum)
{
	__u32 s = (__u32)sum;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* A fresh IPv4 header answering p: from its destination back to its source. */
static __always_inline void reject_ip4(struct iphdr *ip, const struct pkt4 *p, __u8 proto,
				       __u16 len)
{
	__builtin_memset(ip, 0, sizeof(*ip));
	ip->version = 4;
	ip->ihl = 5;
	ip->ttl = REJECT_TTL;
	ip->protocol = proto;
	ip->tot_len = bpf_htons(len);
	ip->saddr = p->daddr;
	ip->daddr = p->saddr;
	ip->check = csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)ip, sizeof(*ip), 0));
}

static __always_inline int reject_swap_eth(struct __sk_buff *skb)
{
	struct ethhdr eth;
	__u8 tmp[ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return -1;
	__builtin_memcpy(tmp, eth.h_source, ETH_ALEN);
	__builtin_memcpy(eth.h_source, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(eth.h_dest, tmp, ETH_ALEN);
	return bpf_skb_store_bytes(skb, 0, &eth, sizeof(eth), 0);
}

/* Cut the frame to the answer, write it after the swapped Ethernet header and
 * send it back out of the interface the packet came in on. */
static __always_inline int reject_send(struct __sk_buff *skb, const void *l3, __u32 len)
{
	if (bpf_skb_change_tail(skb, ETH_HLEN + len, 0))
		return TC_ACT_SHOT;
	if (reject_swap_eth(skb) || bpf_skb_store_bytes(skb, ETH_HLEN, (void *)l3, len, 0))
		return TC_ACT_SHOT;
	return bpf_redirect(skb->ifindex, 0);
}

/* RFC 9293 3.10.7.1: a reset for a segment that reached no listener. */
static __always_inline int reject_tcp4(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct {
		struct iphdr ip;
		struct tcphdr th;
	} out;
	struct pseudo4 ph = {};
	struct tcphdr in;
	__u32 seg_len;
	__s64 sum;

	if (p->tcp_flags & TCP_FLAG_RST)
		return TC_ACT_SHOT; /* never answer a reset */
	if (bpf_skb_load_bytes(skb, p->l4_off, &in, sizeof(in)))
		return TC_ACT_SHOT;
	seg_len = bpf_ntohs(p->tot_len) - (p->l4_off - p->l3_off) - in.doff * 4;
	seg_len += !!(p->tcp_flags & TCP_FLAG_SYN) + !!(p->tcp_flags & TCP_FLAG_FIN);

	__builtin_memset(&out.th, 0, sizeof(out.th));
	out.th.source = p->dport;
	out.th.dest = p->sport;
	out.th.doff = 5;
	out.th.rst = 1;
	if (p->tcp_flags & TCP_FLAG_ACK) {
		out.th.seq = in.ack_seq;
	} else {
		out.th.ack = 1;
		out.th.ack_seq = bpf_htonl(bpf_ntohl(in.seq) + seg_len);
	}
	ph.saddr = p->daddr;
	ph.daddr = p->saddr;
	ph.proto = IPPROTO_TCP;
	ph.len = bpf_htons(sizeof(out.th));
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), 0);
	sum = bpf_csum_diff(NULL, 0, (__be32 *)&out.th, sizeof(out.th), (__u32)sum);
	out.th.check = csum_fold32(sum);
	reject_ip4(&out.ip, p, IPPROTO_TCP, sizeof(out));

	return reject_send(skb, &out, sizeof(out));
}

/* RFC 792: destination unreachable (port), quoting the IP header and the
 * first 8 bytes of the datagram. */
static __always_inline int reject_udp4(struct __sk_buff *skb, const struct pkt4 *p)
{
	struct {
		struct iphdr ip;
		struct icmphdr icmp;
		struct iphdr quoted_ip;
		struct udphdr quoted_udp;
	} out;

	if (p->l4_off - p->l3_off != sizeof(struct iphdr))
		return TC_ACT_SHOT; /* options: rare enough to drop rather than quote */
	if (bpf_skb_load_bytes(skb, p->l3_off, &out.quoted_ip,
			       sizeof(out.quoted_ip) + sizeof(out.quoted_udp)))
		return TC_ACT_SHOT;
	__builtin_memset(&out.icmp, 0, sizeof(out.icmp));
	out.icmp.type = ICMP_DEST_UNREACH;
	out.icmp.code = ICMP_PORT_UNREACH;
	out.icmp.checksum = csum_fold32(bpf_csum_diff(
		NULL, 0, (__be32 *)&out.icmp,
		sizeof(out.icmp) + sizeof(out.quoted_ip) + sizeof(out.quoted_udp), 0));
	reject_ip4(&out.ip, p, IPPROTO_ICMP, sizeof(out));

	return reject_send(skb, &out, sizeof(out));
}

static __always_inline int reject4(struct __sk_buff *skb, const struct pkt4 *p)
{
	stat_inc(LB_STAT_REJECT);
	if (p->proto == IPPROTO_TCP)
		return reject_tcp4(skb, p);
	return reject_udp4(skb, p);
}

#endif /* LBCTL_REJECT_H */
