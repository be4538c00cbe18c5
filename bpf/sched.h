/* Schedulers: which slot of a frontend a new flow goes to (LB_SCHED_*).
 *
 *   random  a random slot (kube-proxy's behaviour)
 *   rr      the slots in turn; the turn is a per-frontend counter (lb_rr)
 *   wrr     the frontend's lb_tables row in turn; the agent writes the row as
 *           an interleave of the backends, each as often as its weight
 *   maglev  row[hash(5-tuple) % len]; the agent writes the row as a Maglev
 *           table, so every node picks the same backend for the same flow
 *           and a backend change moves only the flows it must
 *   sh      the same table, hashed on the source address alone
 *   lc      the slot whose backend has the fewest open flows (lb_conns),
 *           scanning at most LBCTL_LC_SCAN slots from a random one
 *
 * Each returns a backend id (0: none); lb4_select() in lb.h falls back to
 * slot 1 when that id is gone.  The hashes are reproduced bit for bit by
 * lbctl/plan/scheduling.py, which the tests hold the programs to.
 */
#ifndef LBCTL_SCHED_H
#define LBCTL_SCHED_H

/* A 32-bit finalizer (xorshift-multiply): cheap, and every input bit
 * reaches every output bit. */
static __always_inline __u32 lb_mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x7feb352dU;
	h ^= h >> 15;
	h *= 0x846ca68bU;
	h ^= h >> 16;
	return h;
}

/* Addresses and ports are hashed as the packet carries them (network byte
 * order, loaded as host integers). */
static __always_inline __u32 lb_hash_source(__be32 saddr)
{
	return lb_mix32(LB_HASH_SEED ^ saddr);
}

static __always_inline __u32 lb_hash_flow(const struct pkt4 *p)
{
	__u32 h = lb_hash_source(p->saddr);

	h = lb_mix32(h ^ p->daddr);
	h = lb_mix32(h ^ (((__u32)p->sport << 16) | p->dport));
	return lb_mix32(h ^ p->proto);
}

static __always_inline __u32 lb_slot_backend(__u32 frontend_id, __u32 slot)
{
	struct lb_slot_key k = {};
	struct lb_slot *s;

	k.frontend_id = frontend_id;
	k.slot = slot;
	s = lb_slots.lookup(&k);
	return s ? s->backend_id : 0;
}

/* Entry i of the frontend's lb_tables row. */
static __always_inline __u32 lb_table_backend(const struct lb_service *svc, __u32 i)
{
	__u32 len = svc->table_len, idx;
	__u32 *id;

	if (svc->table == 0 || len == 0 || len > LBCTL_TABLE_SIZE)
		return 0;
	idx = (__u32)(svc->table - 1) * LBCTL_TABLE_SIZE + i % len;
	id = lb_tables.lookup(&idx);
	return id ? *id : 0;
}

/* The frontend's next turn: 0, 1, 2, ... shared by every CPU. */
static __always_inline __u32 lb_next_turn(__u32 frontend_id)
{
	__u64 zero = 0, *turn;

	turn = lb_rr.lookup(&frontend_id);
	if (!turn) {
		lb_rr.insert(&frontend_id, &zero);
		turn = lb_rr.lookup(&frontend_id);
		if (!turn)
			return bpf_get_prandom_u32();
	}
	return __sync_fetch_and_add(turn, 1);
}

/* -- least connections -------------------------------------------------------- */

static __always_inline void lb_conn_open(__u32 backend_id)
{
	struct lb_conns zero = {}, *c;

	c = lb_conns.lookup(&backend_id);
	if (!c) {
		lb_conns.insert(&backend_id, &zero);
		c = lb_conns.lookup(&backend_id);
		if (!c)
			return;
	}
	__sync_fetch_and_add(&c->opened, 1);
}

/* The flow e stops counting: whoever takes its `open` first closes it. */
static __always_inline void lb_conn_close(struct ct4_entry *e)
{
	struct lb_conns *c;
	__u32 id = e->backend_id;

	if (!(e->flags & CT_F_LC) || !e->open || !__sync_fetch_and_and(&e->open, 0))
		return;
	c = lb_conns.lookup(&id);
	if (c)
		__sync_fetch_and_add(&c->closed, 1);
}

static __always_inline __s64 lb_open_flows(__u32 backend_id)
{
	struct lb_conns *c = lb_conns.lookup(&backend_id);
	__u64 *expired;
	__s64 n;

	if (!c)
		return 0;
	n = (__s64)(c->opened - c->closed);
	expired = lb_conns_expired.lookup(&backend_id);
	if (expired)
		n -= (__s64)*expired;
	return n;
}

/* The slot scan keeps its best so far in a per-CPU scratch map, not in
 * registers: the verifier does not track map contents, so the paths of one
 * step converge and the loop verifies in linear time. */
static __always_inline __u32 lb_least_conns(const struct lb_service *svc)
{
	struct lc_scan *scan;
	__u32 zero = 0, count = svc->count, start, n, id;
	__s64 open;
	int i;

	scan = lb_lc_scan.lookup(&zero);
	if (!scan)
		return 0;
	scan->best = 0x7fffffffffffffffLL;
	scan->best_id = 0;
	/* Always LBCTL_LC_SCAN steps, the ones past the frontend's slot count
	 * skipped (they would see the same slots again): a loop that may end
	 * early makes the verifier walk the rest of the program once per
	 * possible end, a skipped step converges with a taken one. */
	start = bpf_get_prandom_u32();
	for (i = 0; i < LBCTL_LC_SCAN; i++) {
		if (i >= count)
			continue;
		n = (start + i) % count;
		id = lb_slot_backend(svc->frontend_id, n + 1);
		if (!id)
			continue;
		open = lb_open_flows(id);
		if (open < scan->best) {
			scan->best = open;
			scan->best_id = id;
		}
	}
	return scan->best_id;
}

/* The backend id the frontend's scheduler picks for p (0: none). */
static __always_inline __u32 lb_schedule(const struct lb_service *svc, const struct pkt4 *p)
{
	__u32 count = svc->count;

	switch (svc->sched) {
	case LB_SCHED_RR:
		return lb_slot_backend(svc->frontend_id, lb_next_turn(svc->frontend_id) % count + 1);
	case LB_SCHED_WRR:
		return lb_table_backend(svc, lb_next_turn(svc->frontend_id));
	case LB_SCHED_MAGLEV:
		return lb_table_backend(svc, lb_hash_flow(p));
	case LB_SCHED_SH:
		return lb_table_backend(svc, lb_hash_source(p->saddr));
	case LB_SCHED_LC:
		return lb_least_conns(svc);
	default:
		return lb_slot_backend(svc->frontend_id, bpf_get_prandom_u32() % count + 1);
	}
}

#endif /* LBCTL_SCHED_H */
