/* Map declarations.  Layouts come from lbctl.h; names, sizes and the pin
 * directory are fixed by lbctl/datapath/ebpf/settings.py through -D flags, and
 * every map is pinned there so it outlives the agent (a restart adopts it).
 */
#ifndef LBCTL_MAPS_H
#define LBCTL_MAPS_H

#define LBCTL_PIN(name) LBCTL_PIN_DIR "/" #name

BPF_TABLE_PINNED("hash", struct lb4_key, struct lb_service, lb4_services,
		 LBCTL_MAX_SERVICES, LBCTL_PIN(lb4_services));
BPF_TABLE_PINNED("hash", struct lb_slot_key, struct lb_slot, lb_slots,
		 LBCTL_MAX_SLOTS, LBCTL_PIN(lb_slots));
BPF_TABLE_PINNED("hash", struct lb_member_key, struct lb_member, lb_members,
		 LBCTL_MAX_SLOTS, LBCTL_PIN(lb_members));
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend, lb4_backends,
		 LBCTL_MAX_BACKENDS, LBCTL_PIN(lb4_backends));
BPF_TABLE_PINNED("hash", __u32, struct lb_frontend_meta, lb_frontend_meta,
		 LBCTL_MAX_SERVICES, LBCTL_PIN(lb_frontend_meta));
/* ct4 and nat4 are plain hashes, not LRU ones: when full, a new flow is
 * refused (LB_STAT_CT_FULL, LB_STAT_NAT_EXHAUSTED) instead of evicting an
 * entry of an established flow, which would break it.  The agent's sweep
 * (lbctl/datapath/ebpf/conntrack_gc.py) deletes dead flows and, when a table is nearly
 * full, idle and half-open ones (never an established flow in use). */
BPF_TABLE_PINNED("hash", struct ct4_key, struct ct4_entry, ct4,
		 LBCTL_CT_SIZE, LBCTL_PIN(ct4));
BPF_TABLE_PINNED("percpu_array", __u32, __u64, lb_stats, LB_STAT_MAX,
		 LBCTL_PIN(lb_stats));
BPF_TABLE_PINNED("hash", struct ct4_key, struct nat4_entry, nat4,
		 LBCTL_NAT_SIZE, LBCTL_PIN(nat4));
BPF_TABLE_PINNED("array", __u32, struct lb4_config, lb4_config, 1,
		 LBCTL_PIN(lb4_config));
BPF_TABLE_PINNED7("lpm_trie", struct lb4_cidr_key, __u32, lb4_cluster_cidrs,
		  LBCTL_MAX_CLUSTER_CIDRS, LBCTL_PIN(lb4_cluster_cidrs), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED7("lpm_trie", struct lb4_range_key, __u32, lb4_source_ranges,
		  LBCTL_MAX_SOURCE_RANGES, LBCTL_PIN(lb4_source_ranges), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct sock4_rev_key, struct sock4_rev, sock4_rev,
		 LBCTL_SOCK_REV_SIZE, LBCTL_PIN(sock4_rev));
BPF_TABLE_PINNED("array", __u32, __u32, lb_tables, LBCTL_TABLES * LBCTL_TABLE_SIZE,
		 LBCTL_PIN(lb_tables));
BPF_TABLE_PINNED("hash", __u32, __u64, lb_rr, LBCTL_MAX_SERVICES, LBCTL_PIN(lb_rr));
BPF_TABLE_PINNED("lru_hash", struct lb4_affinity_key, struct lb_affinity, lb4_affinity,
		 LBCTL_AFFINITY_SIZE, LBCTL_PIN(lb4_affinity));
BPF_TABLE_PINNED("hash", __u32, struct lb_conns, lb_conns, LBCTL_MAX_BACKENDS,
		 LBCTL_PIN(lb_conns));
BPF_TABLE_PINNED("hash", __u32, __u64, lb_conns_expired, LBCTL_MAX_BACKENDS,
		 LBCTL_PIN(lb_conns_expired));
BPF_TABLE_PINNED7("percpu_hash", __u32, struct lb_fe_stats, lb_fe_stats,
		  LBCTL_MAX_SERVICES, LBCTL_PIN(lb_fe_stats), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, struct lb_monitor, lb_monitor, 1, LBCTL_PIN(lb_monitor));

/* A pinned ring buffer: bcc's BPF_RINGBUF_OUTPUT with a pin, declared the way
 * lbctl/datapath/ebpf/upgrade/structs.py reads declarations (kind, key, value, name, size
 * in bytes, pin); the key and value only name the record for the layout. */
#define LBCTL_RINGBUF_PINNED(_kind, _key, _leaf, _name, _bytes, _pinned)        \
	struct _name##_table_t {                                               \
		int key;                                                       \
		u32 leaf;                                                      \
		int (*ringbuf_output)(void *, u64, u64);                       \
		void *(*ringbuf_reserve)(u64);                                 \
		void (*ringbuf_discard)(void *, u64);                          \
		void (*ringbuf_submit)(void *, u64);                           \
		u32 max_entries;                                               \
	};                                                                     \
	__attribute__((section("maps/" _kind ":" _pinned)))                    \
	struct _name##_table_t _name = { .max_entries = (_bytes) }
LBCTL_RINGBUF_PINNED("ringbuf", __u32, struct lb_event, lb_events, LB_EVENTS_BYTES,
		     LBCTL_PIN(lb_events));

/* Scratch space of the lc scan (sched.h), one per CPU; not pinned. */
struct lc_scan {
	__s64 best;
	__u32 best_id;
	__u32 pad;
};
BPF_TABLE("percpu_array", __u32, struct lc_scan, lb_lc_scan, 1);

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = lb_stats.lookup(&idx);

	if (v)
		*v += 1;
}

/* The frontend's counters for a packet counted as `stat` (LB_STAT_*) with
 * IP length `len`: one per-CPU lookup, one or two adds. */
static __always_inline void fe_stat(__u32 frontend_id, __u32 stat, __u16 len)
{
	struct lb_fe_stats *s;

	if (!frontend_id)
		return;
	s = lb_fe_stats.lookup(&frontend_id);
	if (!s)
		return;
	switch (stat) {
	case LB_STAT_DNAT_NEW:
		s->new_flows += 1;
		/* fall through */
	case LB_STAT_DNAT_EST:
		s->packets += 1;
		s->bytes += len;
		break;
	case LB_STAT_RNAT:
	case LB_STAT_SNAT_REVERSE:
		s->reply_packets += 1;
		s->reply_bytes += len;
		break;
	case LB_STAT_REJECT:
		s->rejected += 1;
		break;
	case LB_STAT_DROP_NO_BACKEND:
		s->drop_no_backend += 1;
		break;
	case LB_STAT_DROP_SOURCE_RANGE:
		s->drop_source_range += 1;
		break;
	case LB_STAT_DROP_NO_LOCAL:
		s->drop_no_local += 1;
		break;
	case LB_STAT_NAT_EXHAUSTED:
		s->drop_nat_exhausted += 1;
		break;
	}
}

/* The event types someone listens to (lb_monitor), 0 when nobody does or
 * the listener's stamp is stale: the one lookup an event site costs. */
static __always_inline __u32 lb_watched(__u64 now)
{
	__u32 zero = 0;
	struct lb_monitor *m;

	if (!LBCTL_EVENTS) /* compiled out (bench/program.py's baseline) */
		return 0;
	m = lb_monitor.lookup(&zero);
	if (!m || !m->mask || now - m->alive_ns >= LB_MONITOR_STALE_NS)
		return 0;
	return m->mask;
}

static __always_inline struct lb4_config *lb4_settings(void)
{
	__u32 zero = 0;

	return lb4_config.lookup(&zero);
}

#endif /* LBCTL_MAPS_H */
