/* lbctl's BPF programs, compiled as one unit so they share every map.
 *
 *   lbctl_tc.c   tc ingress: balancing, NAT, rejects, source ranges;
 *                tc egress: the replies of the node's own stack
 *   lbctl_sock.c cgroup socket hooks: the node's own processes
 *   lbctl_xdp.c  XDP on the external interfaces: the fast path for traffic
 *                from outside, handing tc what it cannot finish
 *
 * Headers come first, in dependency order; lbctl/datapath/ebpf/settings.py
 * pastes each local file in once.
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
#include "sched.h"
#include "conntrack.h"
#include "lb.h"
#include "forward.h"
#include "reject.h"
#include "nat.h"
#include "flow.h"
#include "events.h"
#include "icmp.h"
#include "xdp.h"

#include "lbctl_tc.c"
#include "lbctl_sock.c"
#include "lbctl_xdp.c"
