"""Layout 1: the map layouts of the lbctl versions that wrote no layout record.

Maps pinned by those versions (up to commit 6e1a90b, the wave-1 release)
carry no description of their structs, so this module freezes it: the text
of their bpf/lbctl.h and their map declarations (bpf/maps.h), verbatim.  An
agent that finds pinned maps without a record (lbctl/datapath/ebpf/upgrade/record.py)
reads them with this layout.  Never edit it: it describes maps that exist on
nodes.  Later layouts describe themselves in the record they pin.
"""

from __future__ import annotations

NAME = "layout 1"
VERSION = "0.1.0 (6e1a90b)"

# bpf/lbctl.h of 6e1a90b
HEADER = """/* lbctl: the one definition of every BPF map layout.
 *
 * The BPF programs include this file; the Python control plane reads the
 * same declarations with cffi (lbctl/datapath/ebpf/layout.py), so neither side
 * packs bytes by hand and the two cannot drift.  Keep it to what cffi's
 * cdef understands: fixed-width integer types, structs, and
 * "#define NAME <integer>" constants.  Map sizes and switches are not here:
 * they reach the compiler as -D flags from lbctl/datapath/ebpf/settings.py.
 *
 * Addresses and ports are stored in network byte order, as packets carry
 * them, so the hot path never converts.
 */
#ifndef LBCTL_H
#define LBCTL_H

/* Frontend scope: which traffic a frontend entry serves. */
#define LB_SCOPE_ALL 0      /* everyone (the only scope of most frontends) */
#define LB_SCOPE_EXTERNAL 1 /* clients from outside the cluster, when the
\t\t\t     * LB_SCOPE_ALL entry has LB_SVC_F_LOCAL */

/* lb_service.flags */
#define LB_SVC_F_CLUSTER_IP 1    /* a ClusterIP: clients from outside the
\t\t\t\t  * cluster CIDRs are masqueraded */
#define LB_SVC_F_EXTERNAL 2      /* NodePort, LoadBalancer IP or externalIP:
\t\t\t\t  * masqueraded unless LB_SVC_F_LOCAL applies */
#define LB_SVC_F_LOCAL 4         /* externalTrafficPolicy Local: outside clients
\t\t\t\t  * use the LB_SCOPE_EXTERNAL entry, unmasqueraded */
#define LB_SVC_F_SOURCE_RANGES 8 /* loadBalancerSourceRanges: only sources in
\t\t\t\t  * lb4_source_ranges get in */
#define LB_SVC_F_DROP_EMPTY 16   /* no backend here but some elsewhere: drop
\t\t\t\t  * new flows silently instead of rejecting */

/* lb_service.sched: how a new flow picks its backend (bpf/sched.h). */
#define LB_SCHED_RANDOM 0 /* a random slot: kube-proxy's behaviour */
#define LB_SCHED_RR 1     /* the slots in turn (lb_rr holds the frontend's turn) */
#define LB_SCHED_WRR 2    /* the frontend's lb_tables row in turn: the row is a
\t\t\t   * weighted interleave of its backends */
#define LB_SCHED_MAGLEV 3 /* row[hash(5-tuple) % len]: a Maglev table */
#define LB_SCHED_SH 4     /* row[hash(source address) % len]: a Maglev table */
#define LB_SCHED_LC 5     /* the slot with the fewest open flows (lb_conns) */

/* The seed of the flow hashes (LB_SCHED_MAGLEV, LB_SCHED_SH).  Every node
 * must use the same one, so they pick the same backend for the same flow. */
#define LB_HASH_SEED 0x6c62636c

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
#define CT_F_UNCOUNTED 4 /* recorded by XDP, whose first packet XDP left to tc:
\t\t\t  * the program that translates a packet of it first
\t\t\t  * counts the new flow */
#define CT_F_LC 8        /* its frontend schedules by least connections: the
\t\t\t  * flow is counted in lb_conns while ct4_entry.open */
#define CT_F_AFFINITY 16 /* its frontend has ClientIP affinity: traffic of the
\t\t\t  * flow keeps the client's lb4_affinity entry alive */
#define CT_F_FIN_ORIG 32  /* TCP: the client sent FIN (or either side RST) */
#define CT_F_FIN_REPLY 64 /* TCP: the backend sent FIN (or either side RST) */
#define CT_F_CLOSED 96    /* CT_F_FIN_ORIG | CT_F_FIN_REPLY */
#define CT_F_REPLY_CLOSED_FIRST 128 /* TCP: the backend's FIN came first, so the
\t\t\t\t     * backend holds the tuple in TIME_WAIT */

/* ct_entry.done */
#define CT_DONE_ACKED 1 /* TCP: closed both ways, the client first, and the client
\t\t\t * has sent its last ACK (or a RST passed): the backend's
\t\t\t * socket is gone, so the tuple may carry a new flow at once */

/* Indexes of lb_stats: one counter per verdict of the programs.  A packet XDP
 * forwards counts its verdict (new_flows, established, ...) and
 * LB_STAT_XDP_REDIRECT; one it passes counts LB_STAT_XDP_PASS or
 * LB_STAT_XDP_TO_TC, then whatever tc does with it. */
#define LB_STAT_PASS 0
#define LB_STAT_DNAT_NEW 1
#define LB_STAT_DNAT_EST 2
#define LB_STAT_RNAT 3
#define LB_STAT_DROP_NO_BACKEND 4 /* a later packet of a rejected flow */
#define LB_STAT_PASS_FRAGMENT 5
#define LB_STAT_REDIRECT 6
#define LB_STAT_CT_FULL 7
#define LB_STAT_REJECT 8
#define LB_STAT_DROP_SOURCE_RANGE 9 /* not in loadBalancerSourceRanges */
#define LB_STAT_DROP_NO_LOCAL 10    /* LB_SVC_F_DROP_EMPTY: no backend on this node */
#define LB_STAT_SNAT_NEW 11         /* a new flow got a NAT port */
#define LB_STAT_NAT_EXHAUSTED 12    /* no free NAT port: the new flow was dropped */
#define LB_STAT_SNAT_REVERSE 13     /* a reply of a masqueraded flow */
#define LB_STAT_SOCK_TRANSLATE 14   /* a node socket's connect/sendmsg sent to a backend */
#define LB_STAT_SOCK_REJECT 15      /* a node socket's connect/sendmsg to a frontend
\t\t\t\t     * without backends failed */
#define LB_STAT_XDP_REDIRECT 16     /* XDP translated a packet and redirected it itself */
#define LB_STAT_XDP_PASS 17         /* XDP passed a packet that is not a plain IPv4 TCP/UDP
\t\t\t\t     * one (options, fragment) or not of a balanced flow */
#define LB_STAT_XDP_TO_TC 18        /* XDP left a balanced packet to tc, untouched: no
\t\t\t\t     * neighbour yet, local destination, TTL 1, MTU,
\t\t\t\t     * forwarding off, a reject to send */
#define LB_STAT_AFFINITY 19       /* a new flow went to its client's affinity backend */
#define LB_STAT_ICMP_ERROR 20       /* an ICMP error about a balanced flow, translated */
#define LB_STAT_MAX 21

/* lb4_config.flags */
#define LB_CFG_F_MASQ_ALL 1   /* masquerade every balanced flow */
#define LB_CFG_F_DETECTOR 2   /* lb4_cluster_cidrs tells pods from outside clients;
\t\t\t       * without it every tc client counts as outside */

/* lb4_config: one entry (index 0) of settings that change at run time. */
struct lb4_config {
\t__be32 snat_addr;     /* the node address masqueraded flows leave with;
\t\t\t       * 0: masquerading is off */
\t__u16 nat_port_min;   /* NAT source ports, host byte order, inclusive */
\t__u16 nat_port_max;
\t__u32 flags;          /* LB_CFG_F_* */
\t__u32 pad;
\t__u64 netns_cookie;   /* the node's network namespace: the socket hooks
\t\t\t       * translate only there */
};

/* lb4_cluster_cidrs (LPM trie): the cluster's pod CIDRs. */
struct lb4_cidr_key {
\t__u32 prefixlen;
\t__be32 addr;
};

/* lb4_source_ranges (LPM trie): (frontend, source prefix) allowed in.
 * prefixlen = 64 + the source prefix length: the frontend part always
 * matches whole. */
struct lb4_range_key {
\t__u32 prefixlen;
\t__be32 vip;
\t__be16 port;
\t__u8 proto;
\t__u8 pad;
\t__be32 saddr;
};

/* lb4_services: (VIP, port, protocol, scope) -> service frontend. */
struct lb4_key {
\t__be32 addr;
\t__be16 port;
\t__u8 proto;
\t__u8 scope;
};

struct lb_service {
\t__u32 frontend_id; /* key of lb_slots and lb_frontend_meta */
\t__u16 count;       /* slots 1..count of lb_slots are live */
\t__u16 flags;       /* LB_SVC_F_* */
\t__u8 sched;        /* LB_SCHED_* */
\t__u8 pad;
\t__u16 table;       /* wrr, maglev, sh: the frontend's row of lb_tables,
\t\t\t    * from 1 (0: none) */
\t__u32 table_len;   /* entries 0..table_len-1 of the row are live */
\t__u32 affinity_s;  /* sessionAffinity ClientIP timeout (0: no affinity) */
};

/* lb_tables (array): row r (from 1), entry i is element
 * (r - 1) * LBCTL_TABLE_SIZE + i; its value is a backend id.  Entries are
 * rewritten in place, a backend being added before the entries naming it
 * and removed after, so every live entry names a live backend. */

/* lb4_affinity (LRU): (frontend, client) -> the backend its flows go to. */
struct lb4_affinity_key {
\t__u32 frontend_id;
\t__be32 client;
};

struct lb_affinity {
\t__u64 last_seen_ns;
\t__u32 backend_id;
\t__u32 pad;
};

/* lb_conns: backend id -> flows of least-connection frontends, counted by
 * the programs (atomically).  Open flows = opened - closed - the agent's
 * lb_conns_expired count (flows that timed out without a FIN or RST). */
struct lb_conns {
\t__u64 opened;
\t__u64 closed;
};

/* lb_slots: (frontend, slot) -> backend id.  Slot numbers start at 1. */
struct lb_slot_key {
\t__u32 frontend_id;
\t__u32 slot;
};

struct lb_slot {
\t__u32 backend_id;
};

/* lb_members: (frontend, backend) present while the backend holds a slot of
 * the frontend.  Conntrack checks it to tell whether a flow's backend is still
 * part of its service (port reuse, UDP flows of removed backends). */
struct lb_member_key {
\t__u32 frontend_id;
\t__u32 backend_id;
};

struct lb_member {
\t__u32 unused;
};

/* lb4_backends: backend id -> where the traffic goes. */
struct lb4_backend {
\t__be32 addr;
\t__be16 port;
\t__u8 proto;
\t__u8 flags; /* LB_BACKEND_F_* */
};

/* lb_frontend_meta: frontend id -> which Service port it belongs to.
 * The datapath never reads it; `lbctl maps dump` and restarts do. */
struct lb_frontend_meta {
\tchar namespace[64];
\tchar name[64];
\tchar port_name[16];
\tchar kind[16]; /* ClusterIP, NodePort, LoadBalancer, ExternalIP */
};

/* lb_fe_stats (per-CPU hash): frontend id -> what the programs did with
 * its traffic.  The agent creates a frontend's entry (zeroed) with the
 * frontend and deletes it with the frontend; the programs only look it up,
 * so a frontend without an entry (per-Service counters off) costs one
 * failed lookup.  Packets and bytes (IP length) are those the programs
 * translated: forward from clients, reply from backends.  A flow's first
 * packet counts once whichever program (XDP or tc) translates it. */
struct lb_fe_stats {
\t__u64 packets;            /* client -> service, translated */
\t__u64 bytes;
\t__u64 reply_packets;      /* backend -> client, translated back */
\t__u64 reply_bytes;
\t__u64 new_flows;          /* connections (UDP flows) started */
\t__u64 rejected;           /* new flows refused: no backend (TCP reset,
\t\t\t\t   * ICMP unreachable) */
\t__u64 drop_no_backend;    /* later packets of a flow without backends */
\t__u64 drop_source_range;  /* outside loadBalancerSourceRanges */
\t__u64 drop_no_local;      /* externalTrafficPolicy Local, no local backend */
\t__u64 drop_nat_exhausted; /* no free NAT port for a masqueraded flow */
};

/* ct4: the connection table.  A balanced flow has two entries:
 *   forward: (client, VIP, client port, VIP port)     -> backend
 *   reverse: (backend, client, backend port, client port) -> VIP
 * A masqueraded flow has its reverse entry in nat4 instead, keyed by the
 * translated tuple: (backend, node address, backend port, NAT port).
 */
struct ct4_key {
\t__be32 saddr;
\t__be32 daddr;
\t__be16 sport;
\t__be16 dport;
\t__u8 proto;
\t__u8 dir; /* CT_DIR_* */
\t__u16 pad;
};

struct ct4_entry {
\t__u64 created_ns;   /* bpf_ktime_get_ns() */
\t__u64 last_seen_ns;
\t__be32 nat_addr;    /* forward: backend; reverse: VIP */
\t__be16 nat_port;
\t__u8 flags;         /* CT_F_* */
\t__u8 done;          /* CT_DONE_* */
\t__u32 backend_id;
\t__u32 frontend_id;
\t__be32 snat_addr;   /* forward: the source the flow leaves with (0: none) */
\t__be16 snat_port;
\t__u16 pad2;
\t__u64 open;         /* CT_F_LC: 1 while the flow counts in lb_conns; taken
\t\t\t     * back to 0 atomically by whoever closes it (64 bits:
\t\t\t     * the atomics that return a value need them) */
};

/* nat4: the NAT table, one entry per masqueraded flow.  Its key is the
 * reply's tuple (backend, node address, backend port, NAT port, proto,
 * CT_DIR_REVERSE), so a NAT port is in use for one backend at a time; the
 * value leads back to the client and to the flow's forward entry, which
 * alone decides whether the binding is alive. */
struct nat4_entry {
\t__u64 created_ns;
\t__be32 client_addr;
\t__be32 vip;
\t__be16 client_port;
\t__be16 vport;
\t__u32 pad;
};

/* sock4_rev: what a host socket asked for, so its peer reads as the service.
 * Written by the connect/sendmsg hooks, read by getpeername/recvmsg. */
struct sock4_rev_key {
\t__u64 cookie;   /* bpf_get_socket_cookie() */
\t__be32 addr;    /* the backend the socket was sent to */
\t__be16 port;
\t__u16 pad;
};

struct sock4_rev {
\t__be32 vip;
\t__be16 vport;
\t__u16 pad;
};

#endif /* LBCTL_H */
"""

# The pinned-map declarations of bpf/maps.h of 6e1a90b
MAP_DECLARATIONS = """BPF_TABLE_PINNED("hash", struct lb4_key, struct lb_service, lb4_services,
\t\t LBCTL_MAX_SERVICES, LBCTL_PIN(lb4_services));
BPF_TABLE_PINNED("hash", struct lb_slot_key, struct lb_slot, lb_slots,
\t\t LBCTL_MAX_SLOTS, LBCTL_PIN(lb_slots));
BPF_TABLE_PINNED("hash", struct lb_member_key, struct lb_member, lb_members,
\t\t LBCTL_MAX_SLOTS, LBCTL_PIN(lb_members));
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend, lb4_backends,
\t\t LBCTL_MAX_BACKENDS, LBCTL_PIN(lb4_backends));
BPF_TABLE_PINNED("hash", __u32, struct lb_frontend_meta, lb_frontend_meta,
\t\t LBCTL_MAX_SERVICES, LBCTL_PIN(lb_frontend_meta));
BPF_TABLE_PINNED("lru_hash", struct ct4_key, struct ct4_entry, ct4,
\t\t LBCTL_CT_SIZE, LBCTL_PIN(ct4));
BPF_TABLE_PINNED("percpu_array", __u32, __u64, lb_stats, LB_STAT_MAX,
\t\t LBCTL_PIN(lb_stats));
BPF_TABLE_PINNED("lru_hash", struct ct4_key, struct nat4_entry, nat4,
\t\t LBCTL_NAT_SIZE, LBCTL_PIN(nat4));
BPF_TABLE_PINNED("array", __u32, struct lb4_config, lb4_config, 1,
\t\t LBCTL_PIN(lb4_config));
BPF_TABLE_PINNED7("lpm_trie", struct lb4_cidr_key, __u32, lb4_cluster_cidrs,
\t\t  LBCTL_MAX_CLUSTER_CIDRS, LBCTL_PIN(lb4_cluster_cidrs), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED7("lpm_trie", struct lb4_range_key, __u32, lb4_source_ranges,
\t\t  LBCTL_MAX_SOURCE_RANGES, LBCTL_PIN(lb4_source_ranges), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct sock4_rev_key, struct sock4_rev, sock4_rev,
\t\t LBCTL_SOCK_REV_SIZE, LBCTL_PIN(sock4_rev));
BPF_TABLE_PINNED("array", __u32, __u32, lb_tables, LBCTL_TABLES * LBCTL_TABLE_SIZE,
\t\t LBCTL_PIN(lb_tables));
BPF_TABLE_PINNED("hash", __u32, __u64, lb_rr, LBCTL_MAX_SERVICES, LBCTL_PIN(lb_rr));
BPF_TABLE_PINNED("lru_hash", struct lb4_affinity_key, struct lb_affinity, lb4_affinity,
\t\t LBCTL_AFFINITY_SIZE, LBCTL_PIN(lb4_affinity));
BPF_TABLE_PINNED("hash", __u32, struct lb_conns, lb_conns, LBCTL_MAX_BACKENDS,
\t\t LBCTL_PIN(lb_conns));
BPF_TABLE_PINNED("hash", __u32, __u64, lb_conns_expired, LBCTL_MAX_BACKENDS,
\t\t LBCTL_PIN(lb_conns_expired));
BPF_TABLE_PINNED7("percpu_hash", __u32, struct lb_fe_stats, lb_fe_stats,
\t\t  LBCTL_MAX_SERVICES, LBCTL_PIN(lb_fe_stats), BPF_F_NO_PREALLOC);
"""
