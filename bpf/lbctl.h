/* lbctl: the one definition of every BPF map layout.
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
			     * LB_SCOPE_ALL entry has LB_SVC_F_LOCAL */

/* lb_service.flags */
#define LB_SVC_F_CLUSTER_IP 1    /* a ClusterIP: clients from outside the
				  * cluster CIDRs are masqueraded */
#define LB_SVC_F_EXTERNAL 2      /* NodePort, LoadBalancer IP or externalIP:
				  * masqueraded unless LB_SVC_F_LOCAL applies */
#define LB_SVC_F_LOCAL 4         /* externalTrafficPolicy Local: outside clients
				  * use the LB_SCOPE_EXTERNAL entry, unmasqueraded */
#define LB_SVC_F_SOURCE_RANGES 8 /* loadBalancerSourceRanges: only sources in
				  * lb4_source_ranges get in */
#define LB_SVC_F_DROP_EMPTY 16   /* no backend here but some elsewhere: drop
				  * new flows silently instead of rejecting */

/* lb_service.sched: how a new flow picks its backend (bpf/sched.h). */
#define LB_SCHED_RANDOM 0 /* a random slot: kube-proxy's behaviour */
#define LB_SCHED_RR 1     /* the slots in turn (lb_rr holds the frontend's turn) */
#define LB_SCHED_WRR 2    /* the frontend's lb_tables row in turn: the row is a
			   * weighted interleave of its backends */
#define LB_SCHED_MAGLEV 3 /* row[hash(5-tuple) % len]: a Maglev table */
#define LB_SCHED_SH 4     /* row[hash(source address) % len]: a Maglev table */
#define LB_SCHED_LC 5     /* the slot with the fewest open flows (lb_conns) */

/* The seed of the flow hashes (LB_SCHED_MAGLEV, LB_SCHED_SH).  Every node
 * must use the same one, so they pick the same backend for the same flow. */
#define LB_HASH_SEED 0x6c62636c

/* lb_backend.flags: the endpoint conditions of EndpointSlice v1 ... */
#define LB_BACKEND_F_READY 1
#define LB_BACKEND_F_SERVING 2
#define LB_BACKEND_F_TERMINATING 4
/* ... and where the endpoint is, as the agent sees it from this node. */
#define LB_BACKEND_F_MASQ_PODS 8 /* outside the pod network (lb4_cluster_cidrs): a
				  * pod's new flow to it is masqueraded, as the
				  * CNI's masquerade rule, which lbctl's redirect
				  * bypasses, would have done */
#define LB_BACKEND_F_HOST 16     /* an address of this node (a hostNetwork
				  * endpoint here): its flows are never
				  * masqueraded; the node's stack answers them
				  * and lbctl_tc_egress translates the replies */

/* ct_key.dir */
#define CT_DIR_FORWARD 0
#define CT_DIR_REVERSE 1

/* ct_entry.flags */
#define CT_F_SEEN_REPLY 1
#define CT_F_CLOSING 2
#define CT_F_UNCOUNTED 4 /* recorded by XDP, whose first packet XDP left to tc:
			  * the program that translates a packet of it first
			  * counts the new flow */
#define CT_F_LC 8        /* its frontend schedules by least connections: the
			  * flow is counted in lb_conns while ct4_entry.open */
#define CT_F_AFFINITY 16 /* its frontend has ClientIP affinity: traffic of the
			  * flow keeps the client's lb4_affinity entry alive */
#define CT_F_FIN_ORIG 32  /* TCP: the client sent FIN (or either side RST) */
#define CT_F_FIN_REPLY 64 /* TCP: the backend sent FIN (or either side RST) */
#define CT_F_CLOSED 96    /* CT_F_FIN_ORIG | CT_F_FIN_REPLY */
#define CT_F_REPLY_CLOSED_FIRST 128 /* TCP: the backend's FIN came first, so the
				     * backend holds the tuple in TIME_WAIT */

/* ct_entry.done */
#define CT_DONE_ACKED 1 /* TCP: closed both ways, the client first, and the client
			 * has sent its last ACK (or a RST passed): the backend's
			 * socket is gone, so the tuple may carry a new flow at once */

/* ct4_entry.retired (forward entries) */
#define CT_RETIRED_REPLY 1 /* a direct flow (the client talking to the backend's
			    * own address from the same port) took this flow's
			    * reply tuple, and its reverse entry was removed so
			    * that the direct flow's replies stay untouched; a new
			    * SYN of this flow (TCP) or its next packet (UDP)
			    * puts the reverse entry back */

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
				     * without backends failed */
#define LB_STAT_XDP_REDIRECT 16     /* XDP translated a packet and redirected it itself */
#define LB_STAT_XDP_PASS 17         /* XDP passed a packet that is not a plain IPv4 TCP/UDP
				     * one (options, fragment) or not of a balanced flow */
#define LB_STAT_XDP_TO_TC 18        /* XDP left a balanced packet to tc, untouched: no
				     * neighbour yet, local destination, TTL 1, MTU,
				     * forwarding off, a reject to send */
#define LB_STAT_AFFINITY 19       /* a new flow went to its client's affinity backend */
#define LB_STAT_ICMP_ERROR 20       /* an ICMP error about a balanced flow, translated */
#define LB_STAT_REPLY_RETIRED 21    /* a direct flow took a balanced flow's reply tuple
				     * (bpf/flow.h: tuple clashes); the packet passed */
#define LB_STAT_EGRESS_RNAT 22      /* a reply (or ICMP error) of the node's own stack
				     * translated by the egress hook; it also counts
				     * its verdict (reverse_nat, icmp_errors_translated) */
#define LB_STAT_MAX 23

/* lb4_config.flags */
#define LB_CFG_F_MASQ_ALL 1   /* masquerade every flow to a ClusterIP (kube-proxy's
			       * masqueradeAll); external frontends keep their rules */
#define LB_CFG_F_DETECTOR 2   /* lb4_cluster_cidrs tells pods from outside clients;
			       * without it every tc client counts as outside */
#define LB_CFG_F_NODE_CIDRS 4 /* lb4_cluster_cidrs holds this node's spec.podCIDRs
			       * (no cluster CIDR was given): kube-proxy's NodeCIDR
			       * detector.  The programs do not read it; `lbctl
			       * maps dump` and `lbctl trace` say it */

/* lb4_config: one entry (index 0) of settings that change at run time. */
struct lb4_config {
	__be32 snat_addr;     /* the node address masqueraded flows leave with;
			       * 0: masquerading is off */
	__u16 nat_port_min;   /* NAT source ports, host byte order, inclusive */
	__u16 nat_port_max;
	__u32 flags;          /* LB_CFG_F_* */
	__u32 pad;
	__u64 netns_cookie;   /* the node's network namespace: the socket hooks
			       * translate only there */
};

/* lb4_cluster_cidrs (LPM trie): the pod network: the cluster's pod CIDRs, or
 * this node's (LB_CFG_F_NODE_CIDRS). */
struct lb4_cidr_key {
	__u32 prefixlen;
	__be32 addr;
};

/* lb4_source_ranges (LPM trie): (frontend, source prefix) allowed in.
 * prefixlen = 64 + the source prefix length: the frontend part always
 * matches whole. */
struct lb4_range_key {
	__u32 prefixlen;
	__be32 vip;
	__be16 port;
	__u8 proto;
	__u8 pad;
	__be32 saddr;
};

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
	__u8 sched;        /* LB_SCHED_* */
	__u8 pad;
	__u16 table;       /* wrr, maglev, sh: the frontend's row of lb_tables,
			    * from 1 (0: none) */
	__u32 table_len;   /* entries 0..table_len-1 of the row are live */
	__u32 affinity_s;  /* sessionAffinity ClientIP timeout (0: no affinity) */
};

/* lb_tables (array): row r (from 1), entry i is element
 * (r - 1) * LBCTL_TABLE_SIZE + i; its value is a backend id.  Entries are
 * rewritten in place, a backend being added before the entries naming it
 * and removed after, so every live entry names a live backend. */

/* lb4_affinity (LRU): (frontend, client) -> the backend its flows go to. */
struct lb4_affinity_key {
	__u32 frontend_id;
	__be32 client;
};

struct lb_affinity {
	__u64 last_seen_ns;
	__u32 backend_id;
	__u32 pad;
};

/* lb_conns: backend id -> flows of least-connection frontends, counted by
 * the programs (atomically).  Open flows = opened - closed - the agent's
 * lb_conns_expired count (flows that timed out without a FIN or RST). */
struct lb_conns {
	__u64 opened;
	__u64 closed;
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
	char kind[16]; /* ClusterIP, NodePort, LoadBalancer, ExternalIP */
};

/* lb_fe_stats (per-CPU hash): frontend id -> what the programs did with
 * its traffic.  The agent creates a frontend's entry (zeroed) with the
 * frontend and deletes it with the frontend; the programs only look it up,
 * so a frontend without an entry (per-Service counters off) costs one
 * failed lookup.  Packets and bytes (IP length) are those the programs
 * translated: forward from clients, reply from backends.  A flow's first
 * packet counts once whichever program (XDP or tc) translates it. */
struct lb_fe_stats {
	__u64 packets;            /* client -> service, translated */
	__u64 bytes;
	__u64 reply_packets;      /* backend -> client, translated back */
	__u64 reply_bytes;
	__u64 new_flows;          /* connections (UDP flows) started */
	__u64 rejected;           /* new flows refused: no backend (TCP reset,
				   * ICMP unreachable) */
	__u64 drop_no_backend;    /* later packets of a flow without backends */
	__u64 drop_source_range;  /* outside loadBalancerSourceRanges */
	__u64 drop_no_local;      /* externalTrafficPolicy Local, no local backend */
	__u64 drop_nat_exhausted; /* no free NAT port for a masqueraded flow */
};

/* ct4: the connection table.  A balanced flow has two entries:
 *   forward: (client, VIP, client port, VIP port)     -> backend
 *   reverse: (backend, client, backend port, client port) -> VIP
 * A masqueraded flow has its reverse entry in nat4 instead, keyed by the
 * translated tuple: (backend, node address, backend port, NAT port).
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
	__u8 done;          /* CT_DONE_* */
	__u32 backend_id;
	__u32 frontend_id;
	__be32 snat_addr;   /* forward: the source the flow leaves with (0: none) */
	__be16 snat_port;
	__u8 retired;       /* CT_RETIRED_* */
	__u8 assured;       /* 1 once the client spoke after a reply (TCP: its
			     * handshake completed): an established flow, which
			     * the agent's sweep never ends to make room in a
			     * full table (a flood's half-open flows it does) */
	__u64 open;         /* CT_F_LC: 1 while the flow counts in lb_conns; taken
			     * back to 0 atomically by whoever closes it (64 bits:
			     * the atomics that return a value need them) */
};

/* nat4: the NAT table, one entry per masqueraded flow.  Its key is the
 * reply's tuple (backend, node address, backend port, NAT port, proto,
 * CT_DIR_REVERSE), so a NAT port is in use for one backend at a time; the
 * value leads back to the client and to the flow's forward entry, which
 * alone decides whether the binding is alive. */
struct nat4_entry {
	__u64 created_ns;
	__be32 client_addr;
	__be32 vip;
	__be16 client_port;
	__be16 vport;
	__u32 pad;
};

/* sock4_rev: what a host socket asked for, so its peer reads as the service.
 * Written by the connect/sendmsg hooks, read by getpeername/recvmsg. */
struct sock4_rev_key {
	__u64 cookie;   /* bpf_get_socket_cookie() */
	__be32 addr;    /* the backend the socket was sent to */
	__be16 port;
	__u16 pad;
};

struct sock4_rev {
	__be32 vip;
	__be16 vport;
	__u16 pad;
};

/* lb_monitor: one entry (index 0), the switch of the event stream.  The
 * programs emit an event (struct lb_event, into lb_events) of type t only
 * while bit 1 << t of mask is set and alive_ns is less than
 * LB_MONITOR_STALE_NS old: `lbctl monitor` sets the mask and refreshes the
 * stamp every second, clears the mask when it exits, and a killed monitor's
 * mask goes stale on its own.  Each event site costs this one lookup when
 * nobody listens; established flows' packets pass no event site. */
#define LB_EV_DROP 1          /* reason: the LB_STAT_* it was counted as */
#define LB_EV_REJECT 2        /* a new flow to a frontend without backends */
#define LB_EV_NEW_FLOW 3      /* a flow started: its backend was chosen */
#define LB_EV_NAT 4           /* a new masqueraded flow got a NAT port */
#define LB_EV_NAT_EXHAUSTED 5 /* no free NAT port (or NAT table full): dropped */
#define LB_EV_ICMP 6          /* an ICMP error about a balanced flow, translated */
#define LB_EV_MAX 7
#define LB_MONITOR_STALE_NS 3000000000
#define LB_EVENTS_BYTES 262144 /* lb_events' size: a power of two of pages */

/* lb_event.hook */
#define LB_HOOK_TC_INGRESS 0
#define LB_HOOK_TC_EGRESS 1
#define LB_HOOK_XDP 2

struct lb_monitor {
	__u64 alive_ns; /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last refresh */
	__u32 mask;     /* 1 << LB_EV_* of the types someone listens to */
	__u32 pid;      /* the monitor's process id (one reader at a time) */
};

/* lb_events (ring buffer): one record per event. */
struct lb_event {
	__u64 ts_ns;        /* bpf_ktime_get_ns() */
	__u8 type;          /* LB_EV_* */
	__u8 reason;        /* LB_STAT_* of the verdict */
	__u8 proto;         /* IPPROTO_TCP, IPPROTO_UDP */
	__u8 hook;          /* LB_HOOK_* */
	__u32 frontend_id;  /* 0: none known */
	__u32 backend_id;   /* 0: none chosen */
	__be32 saddr;       /* the packet as it came: client ... */
	__be32 daddr;       /* ... and the Service address it went to
			     * (LB_EV_ICMP: the error's sender and
			     * destination, no ports) */
	__be16 sport;
	__be16 dport;
	__be32 nat_addr;    /* LB_EV_NAT: the source the flow leaves with;
			     * LB_EV_ICMP: where the translated error went */
	__be16 nat_port;
	__u16 pad;
};

#endif /* LBCTL_H */
