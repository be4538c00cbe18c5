"""`lbctl trace`'s masquerade decision: what flow4_new() and masq4_backend()
(bpf/flow.h, bpf/nat.h) decide for a new flow's source, and why.

The frontend decides first (kube-proxy's rules: a ClusterIP masquerades
clients outside the pod network, an outside-facing frontend everyone unless
externalTrafficPolicy is Local, masqueradeAll every client of a ClusterIP);
then the backend's place has its say (lb4_backend.flags, set by the agent): an address of this
node is never masqueraded, the client itself (hairpin) always is, and a pod
reaching an endpoint outside the pod network is.
"""

from __future__ import annotations

from typing import Any

from lbctl.datapath.ebpf import layout
from lbctl.datapath.ebpf.trace.view import Be, Config, Packet, Svc

_C = layout.const
_SVC_F_CLUSTER_IP = _C("LB_SVC_F_CLUSTER_IP")
_SVC_F_EXTERNAL = _C("LB_SVC_F_EXTERNAL")
_SVC_F_LOCAL = _C("LB_SVC_F_LOCAL")
_CFG_F_MASQ_ALL = _C("LB_CFG_F_MASQ_ALL")
_CFG_F_DETECTOR = _C("LB_CFG_F_DETECTOR")
_CFG_F_NODE_CIDRS = _C("LB_CFG_F_NODE_CIDRS")
_BACKEND_F_HOST = _C("LB_BACKEND_F_HOST")
_BACKEND_F_MASQ_PODS = _C("LB_BACKEND_F_MASQ_PODS")


def pod_network(cfg: Config | None) -> str:
    """What lb4_cluster_cidrs are, in words."""
    if cfg is not None and cfg.flags & _CFG_F_NODE_CIDRS:
        return "this node's pod CIDRs (the Node's spec.podCIDRs; no cluster CIDR is set)"
    return "the cluster CIDRs"


def on_this_node(be: Be) -> bool:
    return bool(be.flags & _BACKEND_F_HOST)


def decide(svc: Svc, cfg: Config | None, internal: bool, be: Be, p: Packet) -> tuple[bool, str]:
    """(masqueraded, why) for a new flow of p to backend be through svc."""
    masq, why = False, ""
    net = pod_network(cfg)
    masq_all = cfg is not None and bool(cfg.flags & _CFG_F_MASQ_ALL)
    if svc.flags & _SVC_F_CLUSTER_IP:
        detector = cfg is not None and bool(cfg.flags & _CFG_F_DETECTOR)
        masq = detector and not internal
        why = (
            f"a ClusterIP reached from outside {net}"
            if masq
            else f"a ClusterIP reached from inside {net}"
            if detector
            else "a ClusterIP, and no cluster CIDRs tell outside clients apart"
        )
        if masq_all:
            masq, why = True, "masqueradeAll: every client of a ClusterIP"
    elif svc.flags & _SVC_F_EXTERNAL:
        masq = not svc.flags & _SVC_F_LOCAL
        why = (
            "an outside-facing frontend with externalTrafficPolicy Cluster"
            if masq
            else "externalTrafficPolicy Local keeps the client's address"
            + (" (masqueradeAll covers ClusterIPs only)" if masq_all else "")
        )
    if be.flags & _BACKEND_F_HOST:
        return False, (
            f"{be.address} is an address of this node: the packet is delivered to the node's "
            "own stack, which masquerades no incoming packet"
        )
    if be.address == p.src:
        return True, "hairpin: the client is the backend"
    if not masq and be.flags & _BACKEND_F_MASQ_PODS and internal:
        return True, (
            f"a pod reaching {be.address}, outside {net}: lbctl forwards past the node's "
            "netfilter, so it masquerades as the CNI's masquerade rule would"
        )
    return masq, why


def record(
    t: Any, svc: Svc, cfg: Config | None, internal: bool, candidates: list[Be], p: Packet
) -> None:
    """The masquerade of the chosen backend (one candidate), or of each candidate
    when they differ, into the trace's document; a note for backends on this node."""
    snat = cfg.snat_addr if cfg is not None else None
    rows = []
    for be in candidates:
        masq, why = decide(svc, cfg, internal, be, p)
        applies = masq and snat is not None
        if masq and not applies:
            why += ", but no masquerade address is set"
        address = str(snat) if applies else None
        rows.append({"backend": str(be), "applies": applies, "address": address, "why": why})
    if not rows:
        return
    if all((r["applies"], r["why"]) == (rows[0]["applies"], rows[0]["why"]) for r in rows):
        t.doc["masquerade"] = {
            "applies": rows[0]["applies"],
            "address": str(snat) if rows[0]["applies"] else None,
            "why": rows[0]["why"],
        }
    else:
        t.doc["masquerade"] = {
            "applies": None,  # depends on the backend
            "address": str(snat) if snat is not None else None,
            "why": "it depends on the backend",
            "byBackend": rows,
        }
    host = [str(be) for be in candidates if on_this_node(be)]
    if host:
        t.note(
            f"{', '.join(host)} {'is an address' if len(host) == 1 else 'are addresses'} of "
            "this node: the translated packet goes to the node's own stack, and the reply "
            "leaves through the tc egress hook (lbctl_tc_egress) of the interface towards "
            "the client, which gives it the Service's address back (counted as "
            "egress_reverse_nat)"
        )
