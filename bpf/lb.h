/* Service lookup and backend choice. */
#ifndef LBCTL_LB_H
#define LBCTL_LB_H

static __always_inline struct lb_service *lb4_lookup(const struct pkt4 *p, __u8 scope)
{
	struct lb4_key k = {};

	k.addr = p->daddr;
	k.port = p->dport;
	k.proto = p->proto;
	k.scope = scope;
	return lb4_services.lookup(&k);
}

/* The backend of the frontend's scheduler for p.  Slots are written before
 * the count is raised and the last slot is copied into a hole before the
 * count is lowered, so a slot inside the count always names a live backend,
 * and table rows name only backends that are live; a reader that saw an old
 * count or row falls back to slot 1, which is live while the count is. */
static __always_inline struct lb4_backend *lb4_select(const struct lb_service *svc,
						     const struct pkt4 *p, __u32 *backend_id)
{
	struct lb4_backend *be;
	__u32 id;

	if (svc->count == 0)
		return NULL;
	id = lb_schedule(svc, p);
	if (id) {
		be = lb4_backends.lookup(&id);
		if (be) {
			*backend_id = id;
			return be;
		}
	}
	id = lb_slot_backend(svc->frontend_id, 1);
	if (!id)
		return NULL;
	*backend_id = id;
	return lb4_backends.lookup(&id);
}

static __always_inline int lb_is_member(__u32 frontend_id, __u32 backend_id)
{
	struct lb_member_key k = {};

	k.frontend_id = frontend_id;
	k.backend_id = backend_id;
	return lb_members.lookup(&k) != NULL;
}

/* sessionAffinity ClientIP: the backend the client's last flows went to,
 * while it is still in the frontend and the timeout has not passed since
 * the client's last traffic; then the scheduler's choice, remembered. */
static __always_inline struct lb4_backend *lb4_choose(const struct lb_service *svc,
						     const struct pkt4 *p, __u64 now,
						     __u32 *backend_id)
{
	struct lb4_affinity_key k = {};
	struct lb_affinity fresh = {}, *a;
	struct lb4_backend *be;
	__u32 id;

	if (!svc->affinity_s)
		return lb4_select(svc, p, backend_id);
	k.frontend_id = svc->frontend_id;
	k.client = p->saddr;
	a = lb4_affinity.lookup(&k);
	if (a && age_ns(now, a->last_seen_ns) <= (__u64)svc->affinity_s * 1000000000ULL) {
		id = a->backend_id;
		if (lb_is_member(svc->frontend_id, id)) {
			be = lb4_backends.lookup(&id);
			if (be) {
				a->last_seen_ns = now;
				*backend_id = id;
				stat_inc(LB_STAT_AFFINITY);
				return be;
			}
		}
	}
	be = lb4_select(svc, p, backend_id);
	if (be) {
		fresh.last_seen_ns = now;
		fresh.backend_id = *backend_id;
		lb4_affinity.update(&k, &fresh);
	}
	return be;
}

/* Traffic of a flow keeps its client's affinity alive. */
static __always_inline void lb4_affinity_touch(const struct ct4_entry *ct, __be32 client,
					       __u64 now)
{
	struct lb4_affinity_key k = {};
	struct lb_affinity *a;

	k.frontend_id = ct->frontend_id;
	k.client = client;
	a = lb4_affinity.lookup(&k);
	if (a && a->backend_id == ct->backend_id)
		a->last_seen_ns = now;
}

/* Is the backend a flow was pinned to still part of its frontend, at the
 * same address?  (The address check guards against an id reused across an
 * agent restart.) */
static __always_inline struct lb4_backend *lb4_backend_member(const struct ct4_entry *e)
{
	struct lb4_backend *be;
	__u32 id = e->backend_id;

	if (!lb_is_member(e->frontend_id, id))
		return NULL;
	be = lb4_backends.lookup(&id);
	if (!be || be->addr != e->nat_addr || be->port != e->nat_port)
		return NULL;
	return be;
}

#endif /* LBCTL_LB_H */
