/* The event stream (`lbctl monitor`): drops, rejects, new flows, NAT ports
 * given or missing, ICMP errors translated, into the lb_events ring buffer.
 *
 * Each event site first reads lb_monitor (maps.h: lb_watched); with nobody
 * listening that lookup is all it costs.  Sites are only on the paths that
 * decide something (a drop, a reject, a flow's start, an ICMP error), never
 * on an established flow's packets.
 */
#ifndef LBCTL_EVENTS_H
#define LBCTL_EVENTS_H

static __always_inline void event_send(struct lb_event *ev, __u32 type, __u32 reason,
				       __u8 hook, __u64 now, const struct pkt4 *p,
				       const struct flow4 *x)
{
	ev->ts_ns = now;
	ev->type = type;
	ev->reason = reason;
	ev->proto = p->proto;
	ev->hook = hook;
	ev->frontend_id = x->frontend_id;
	ev->backend_id = x->backend_id;
	ev->saddr = p->saddr;
	ev->daddr = p->daddr;
	ev->sport = p->sport;
	ev->dport = p->dport;
	lb_events.ringbuf_output(ev, sizeof(*ev), 0);
}

/* p (as it came) was dropped or rejected as x->stat says. */
static __always_inline void event_drop(__u8 hook, __u64 now, const struct pkt4 *p,
				       const struct flow4 *x)
{
	struct lb_event ev;
	__u32 mask = lb_watched(now), type;

	if (!mask)
		return;
	type = x->stat == LB_STAT_REJECT	  ? LB_EV_REJECT
	       : x->stat == LB_STAT_NAT_EXHAUSTED ? LB_EV_NAT_EXHAUSTED
						  : LB_EV_DROP;
	if (!(mask & (1U << type)))
		return;
	__builtin_memset(&ev, 0, sizeof(ev));
	event_send(&ev, type, x->stat, hook, now, p, x);
}

/* p started the flow x, masqueraded when x->snat (x->saddr:sport is then
 * its NAT address and port). */
static __always_inline void event_new(__u8 hook, __u64 now, const struct pkt4 *p,
				      const struct flow4 *x)
{
	__u32 mask = lb_watched(now);
	struct lb_event ev;

	if (!(mask & ((1U << LB_EV_NEW_FLOW) | (1U << LB_EV_NAT))))
		return;
	__builtin_memset(&ev, 0, sizeof(ev));
	if (mask & (1U << LB_EV_NEW_FLOW))
		event_send(&ev, LB_EV_NEW_FLOW, LB_STAT_DNAT_NEW, hook, now, p, x);
	if (x->snat && (mask & (1U << LB_EV_NAT))) {
		ev.nat_addr = x->saddr;
		ev.nat_port = x->sport;
		event_send(&ev, LB_EV_NAT, LB_STAT_SNAT_NEW, hook, now, p, x);
	}
}

#endif /* LBCTL_EVENTS_H */
