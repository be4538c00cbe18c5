/* lbctl tc program (clsact ingress, direct action): ClusterIP balancing.
 *
 * For every IPv4 TCP/UDP packet:
 *   1. an established flow (forward conntrack hit) is DNATed to its backend;
 *   2. a packet to a service frontend starts a flow: a backend is chosen,
 *      conntrack remembers it, and the packet is DNATed;
 *      a service without backends rejects it (TCP reset, ICMP unreachable);
 *   3. a reply from a backend (reverse conntrack hit, confirmed by its
 *      forward twin) is reverse-NATed so the client sees the VIP;
 *   4. everything else passes untouched.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <linux/socket.h>

#include "lbctl.h"
#include "maps.h"
#include "packet.h"
#include "conntrack.h"
#include "lb.h"
#include "forward.h"
#include "reject.h"

static __always_inline int is_new_tcp(const struct pkt4 *p)
{
	return p->proto == IPPROTO_TCP &&
	       (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

static __always_inline int dnat4(struct __sk_buff *skb, struct pkt4 *p,
				 __be32 addr, __be16 port, __u32 stat)
{
	if (rewrite4(skb, p, 0, addr, port))
		return TC_ACT_SHOT;
	stat_inc(stat);
	return forward4(skb, p);
}

/* A reply from a backend: restore the VIP as its source. */
static __always_inline int reverse_nat4(struct __sk_buff *skb, struct pkt4 *p, __u64 now)
{
	struct ct4_key k = {};
	struct ct4_entry *rev, *fwd;

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
	if (!fwd || fwd->nat_addr != p->saddr || fwd->nat_port != p->sport)
		return -1;
	if (!ct_alive(fwd, p->proto, now))
		return -1;
	ct_touch(fwd, p, now);
	if (!(fwd->flags & CT_F_SEEN_REPLY))
		fwd->flags |= CT_F_SEEN_REPLY;
	if (rewrite4(skb, p, 1, rev->nat_addr, rev->nat_port))
		return TC_ACT_SHOT;
	stat_inc(LB_STAT_RNAT);
	return forward4(skb, p);
}

int lbctl_tc_ingress(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	struct ct4_key k = {};
	struct ct4_entry *ct;
	struct lb_service *svc;
	struct lb4_backend *be;
	__u32 backend_id = 0;
	__u64 now;
	int rc;

	rc = parse_ipv4(skb, &p);
	if (rc != PARSE_OK) {
		stat_inc(rc == PARSE_FRAGMENT ? LB_STAT_PASS_FRAGMENT : LB_STAT_PASS);
		return TC_ACT_OK;
	}
	now = bpf_ktime_get_ns();

	ct4_forward_key(&k, &p);
	ct = ct4.lookup(&k);
	if (ct && ct_alive(ct, p.proto, now)) {
		__be32 addr = ct->nat_addr;
		__be16 port = ct->nat_port;

		/* An established TCP connection keeps its backend until it ends. */
		if (p.proto == IPPROTO_TCP && !is_new_tcp(&p)) {
			ct_touch(ct, &p, now);
			return dnat4(skb, &p, addr, port, LB_STAT_DNAT_EST);
		}
		/* A SYN on a known tuple is a new connection reusing the port, and
		 * a UDP flow has no end: both keep their backend only while it is
		 * still in the service (kube-proxy likewise flushes the UDP
		 * conntrack of removed endpoints). */
		be = lb4_backend_member(ct);
		if (be) {
			if (is_new_tcp(&p)) {
				/* fresh entries: the old connection's flags must not carry over */
				ct4_create(&p, be, ct->backend_id, ct->frontend_id, now, 0);
				return dnat4(skb, &p, addr, port, LB_STAT_DNAT_NEW);
			}
			ct_touch(ct, &p, now);
			return dnat4(skb, &p, addr, port, LB_STAT_DNAT_EST);
		}
	}

	svc = lb4_lookup(&p);
	if (svc) {
		__u32 frontend_id = svc->frontend_id;

		be = lb4_select(svc, &backend_id);
		if (!be) {
			/* A new connection is refused at once; anything else of a
			 * flow that has no backend any more is dropped. */
			if (p.proto == IPPROTO_UDP || is_new_tcp(&p))
				return reject4(skb, &p);
			stat_inc(LB_STAT_DROP_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		/* With no entry yet, insert exclusively: when the first packets of
		 * a flow race on two CPUs, the loser follows the winner's backend. */
		rc = ct4_create(&p, be, backend_id, frontend_id, now, ct == NULL);
		if (rc == CT_LOST_RACE) {
			ct = ct4.lookup(&k);
			if (ct)
				return dnat4(skb, &p, ct->nat_addr, ct->nat_port, LB_STAT_DNAT_EST);
		} else if (rc == CT_FAILED) {
			stat_inc(LB_STAT_CT_FULL);
		}
		return dnat4(skb, &p, be->addr, be->port, LB_STAT_DNAT_NEW);
	}

	rc = reverse_nat4(skb, &p, now);
	if (rc >= 0)
		return rc;
	stat_inc(LB_STAT_PASS);
	return TC_ACT_OK;
}
