/* lbctl: the one definition of every BPF map layout.
 *
 * The BPF programs include this file; the Python control plane reads the
 * same declarations with cffi (lbctl/datapath/layout.py), so neither side
 * packs bytes by hand and the two cannot drift.  Keep it to what cffi's
 * cdef understands: fixed-width integer types, structs, and
 * "#define NAME <integer>" constants.  Map sizes and switches are not here:
 * they reach the compiler as -D flags from lbctl/datapath/settings.py.
 *
 * Addresses and ports are stored in network byte order, as packets carry
 * them, so the hot path never converts.
 */
#ifndef LBCTL_H
#define LBCTL_H

/* Frontend scope: which traffic a frontend entry serves. */
#define LB_SCOPE_ALL 0

/* lb_service.flags */
#define LB_SVC_F_CLUSTER_IP 1

/* lb_backend.flags: the endpoint conditions of EndpointSlice v1. */
#define LB_BACKEND_F_READY 1
#define LB_BACKEND_F_SERVING 2
#define LB_BACKEND_F_TERMINATING 4

/* ct_key.dir */
#define CT_DIR_FORWARD 0
#define CT_DIR_REVERSE 1

/* ct_entry.flags */
#define CT_F_SEEN_REPLY 1
#define CT_F_CLOSING 2

/* Indexes of lb_stats: one counter per verdict of the tc program. */
#define LB_STAT_PASS 0
#define LB_STAT_DNAT_NEW 1
#define LB_STAT_DNAT_EST 2
#define LB_STAT_RNAT 3
#define LB_STAT_DROP_NO_BACKEND 4 /* a later packet of a rejected flow */
#define LB_STAT_PASS_FRAGMENT 5
#define LB_STAT_REDIRECT 6
#define LB_STAT_CT_FULL 7
#define LB_STAT_REJECT 8
#define LB_STAT_MAX 9

/* lb4_services: (VIP, port, protocol, scope) -> service frontend. */
struct lb4_key {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 scope;
};

struct lb_service {
	__u32 frontend_id; /* key of lb_slots and lb_frontend_meta */
	__u16 count;       /* slots 1..count of lb_slots are live */
	__u16 flags;       /* LB_SVC_F_* */
};

/* lb_slots: (frontend, slot) -> backend id.  Slot numbers start at 1. */
struct lb_slot_key {
	__u32 frontend_id;
	__u32 slot;
};

struct lb_slot {
	__u32 backend_id;
};

/* lb_members: (frontend, backend) present while the backend holds a slot of
 * the frontend.  Conntrack checks it to tell whether a flow's backend is still
 * part of its service (port reuse, UDP flows of removed backends). */
struct lb_member_key {
	__u32 frontend_id;
	__u32 backend_id;
};

struct lb_member {
	__u32 unused;
};

/* lb4_backends: backend id -> where the traffic goes. */
struct lb4_backend {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 flags; /* LB_BACKEND_F_* */
};

/* lb_frontend_meta: frontend id -> which Service port it belongs to.
 * The datapath never reads it; `lbctl maps dump` and restarts do. */
struct lb_frontend_meta {
	char namespace[64];
	char name[64];
	char port_name[16];
};

/* ct4: the connection table.  A balanced flow has two entries:
 *   forward: (client, VIP, client port, VIP port)     -> backend
 *   reverse: (backend, client, backend port, client port) -> VIP
 */
struct ct4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir; /* CT_DIR_* */
	__u16 pad;
};

struct ct4_entry {
	__u64 created_ns;   /* bpf_ktime_get_ns() */
	__u64 last_seen_ns;
	__be32 nat_addr;    /* forward: backend; reverse: VIP */
	__be16 nat_port;
	__u8 flags;         /* CT_F_* */
	__u8 pad;
	__u32 backend_id;
	__u32 frontend_id;
};

#endif /* LBCTL_H */
