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

/* Pick a backend among slots 1..count.  Slots are written before the count
 * is raised and the last slot is copied into a hole before the count is
 * lowered, so a slot inside the count always names a live backend; a slot
 * beyond it (a reader that saw the old count) falls back to slot 1. */
static __always_inline struct lb4_backend *lb4_select(const struct lb_service *svc,
						     __u32 *backend_id)
{
	struct lb_slot_key k = {};
	struct lb_slot *slot;
	__u16 count = svc->count;

	if (count == 0)
		return NULL;
	k.frontend_id = svc->frontend_id;
	k.slot = bpf_get_prandom_u32() % count + 1;
	slot = lb_slots.lookup(&k);
	if (slot) {
		struct lb4_backend *be;

		*backend_id = slot->backend_id;
		be = lb4_backends.lookup(backend_id);
		if (be)
			return be;
	}
	/* The slot or its backend went away between reading the count and
	 * now: slot 1 is live while the count is positive. */
	k.slot = 1;
	slot = lb_slots.lookup(&k);
	if (!slot)
		return NULL;
	*backend_id = slot->backend_id;
	return lb4_backends.lookup(backend_id);
}

/* Is the backend a flow was pinned to still part of its frontend, at the
 * same address?  (The address check guards against an id reused across an
 * agent restart.) */
static __always_inline struct lb4_backend *lb4_backend_member(const struct ct4_entry *e)
{
	struct lb_member_key k = {};
	struct lb4_backend *be;
	__u32 id = e->backend_id;

	k.frontend_id = e->frontend_id;
	k.backend_id = id;
	if (!lb_members.lookup(&k))
		return NULL;
	be = lb4_backends.lookup(&id);
	if (!be || be->addr != e->nat_addr || be->port != e->nat_port)
		return NULL;
	return be;
}

#endif /* LBCTL_LB_H */
