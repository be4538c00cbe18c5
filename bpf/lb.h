/* Service lookup and backend choice. */
#ifndef LBCTL_LB_H
#define LBCTL_LB_H

static __always_inline struct lb_service *lb4_lookup(const struct pkt4 *p)
{
	struct lb4_key k = {};

	k.addr = p->daddr;
	k.port = p->dport;
	k.proto = p->proto;
	k.scope = LB_SCOPE_ALL;
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
	if (!slot) {
		k.slot = 1;
		slot = lb_slots.lookup(&k);
		if (!slot)
			return NULL;
	}
	*backend_id = slot->backend_id;
	return lb4_backends.lookup(backend_id);
}

/* Is the backend a flow was pinned to still part of its frontend?  Ids are
 * not reused while the agent runs, so a membership names this very pair. */
static __always_inline int lb4_backend_member(const struct ct4_entry *e)
{
	struct lb_member_key k = {};

	k.frontend_id = e->frontend_id;
	k.backend_id = e->backend_id;
	return lb_members.lookup(&k) != NULL;
}

#endif /* LBCTL_LB_H */
