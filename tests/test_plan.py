"""The plan: frontends and eligible backends from the model (pure)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

import pytest

from lbctl.model import (
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Protocol,
    Service,
    ServicePort,
    ServiceRef,
    ServiceTable,
)
from lbctl.plan.planner import SCOPE_EXTERNAL, FrontendKey, NodeContext, Planner, plan_service

pytestmark = pytest.mark.unit  # pure: make unit runs it without root

IP = ipaddress.ip_address
REF = ServiceRef("ns", "web")


def svc(vip: str = "10.96.0.10", ref: ServiceRef = REF) -> Service:
    return Service(
        ref=ref,
        type="ClusterIP",
        cluster_ips=(IP(vip),),
        ports=(
            ServicePort("http", Protocol.TCP, 80),
            ServicePort("dns", Protocol.UDP, 53),
        ),
    )


def slice_(name: str, *addrs: str, ready: bool = True, port: int = 8080) -> EndpointSlice:
    return EndpointSlice(
        namespace="ns",
        name=name,
        service_name="web",
        address_type="IPv4",
        ports=(EndpointPort("http", Protocol.TCP, port), EndpointPort("dns", Protocol.UDP, 5353)),
        endpoints=tuple(Endpoint((IP(a),), ready=ready) for a in addrs),
    )


def test_frontend_per_port_with_matching_backends() -> None:
    plan = plan_service(svc(), [slice_("a", "10.0.0.1", "10.0.0.2")])
    http = plan[FrontendKey(IP("10.96.0.10"), 80, Protocol.TCP)]
    dns = plan[FrontendKey(IP("10.96.0.10"), 53, Protocol.UDP)]
    assert [str(b) for b in http.backends] == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert [str(b) for b in dns.backends] == ["10.0.0.1:5353", "10.0.0.2:5353"]
    assert http.port_name == "http" and http.service == REF


def test_slices_merge_dedupe_and_skip_unready() -> None:
    plan = plan_service(
        svc(),
        [
            slice_("a", "10.0.0.1", "10.0.0.2"),
            slice_("b", "10.0.0.2", "10.0.0.3"),
            slice_("c", "10.0.0.9", ready=False),
        ],
    )
    http = plan[FrontendKey(IP("10.96.0.10"), 80, Protocol.TCP)]
    assert [str(b.address) for b in http.backends] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_planner_replans_only_touched_services() -> None:
    table = ServiceTable()
    planner = Planner()
    refs = [table.set_service(svc(f"10.96.1.{i}", ServiceRef("ns", f"s{i}"))) for i in range(50)]
    first = planner.update(table, refs)
    assert len(first.upserts) == 100 and not first.removals
    touched = table.set_slice(
        EndpointSlice("ns", "s7-x", "s7", "IPv4", (EndpointPort("http", Protocol.TCP, 80),), ())
    )
    assert touched == {ServiceRef("ns", "s7")}
    again = planner.update(table, touched)
    # the new slice has no ready endpoint: nothing changed at all
    assert not again
    table.remove_service(ServiceRef("ns", "s7"))
    gone = planner.update(table, {ServiceRef("ns", "s7")})
    assert sorted(k.port for k in gone.removals) == [53, 80] and not gone.upserts


def test_conflicting_frontend_goes_to_the_first_and_moves_when_freed() -> None:
    table = ServiceTable()
    planner = Planner()
    a, b = ServiceRef("ns", "a"), ServiceRef("ns", "b")
    planner.update(table, {table.set_service(svc("10.96.0.10", a))})
    clash = planner.update(table, {table.set_service(svc("10.96.0.10", b))})
    assert not clash and b in planner.conflicts
    assert "already served by Service ns/a" in planner.conflicts[b]
    moved = planner.update(table, {table.remove_service(a)})
    assert {fe.service for fe in moved.upserts} == {b}
    assert not planner.conflicts


def test_address_moved_between_services_in_one_batch_is_kept() -> None:
    table = ServiceTable()
    planner = Planner()
    old, new = ServiceRef("ns", "z-old"), ServiceRef("ns", "a-new")
    planner.update(table, {table.set_service(svc("10.96.0.50", old))})
    # One poll: the address leaves z-old and joins a-new (planned first: "a" < "z").
    table.remove_service(old)
    table.set_service(svc("10.96.0.50", new))
    change = planner.update(table, {old, new})
    assert {fe.service for fe in change.upserts} == {new}
    assert {fe.service for fe in planner.frontends().values()} == {new}
    assert not planner.conflicts


# -- frontends for traffic from outside ------------------------------------------


def outside_service(policy: str = "Cluster") -> Service:
    return Service(
        ref=REF,
        type="LoadBalancer",
        cluster_ips=(IP("10.96.0.10"),),
        ports=(ServicePort("http", Protocol.TCP, 80, node_port=30080),),
        external_ips=(IP("192.0.2.50"),),
        load_balancer_ips=(IP("203.0.113.9"), IP("2001:db8::9")),
        external_traffic_policy=policy,
        load_balancer_source_ranges=(ipaddress.ip_network("198.51.100.0/24"),),
    )


def placed(*where: tuple[str, str]) -> EndpointSlice:
    return EndpointSlice(
        namespace="ns",
        name="web-1",
        service_name="web",
        address_type="IPv4",
        ports=(EndpointPort("http", Protocol.TCP, 8080),),
        endpoints=tuple(Endpoint((IP(a),), node_name=n) for a, n in where),
    )


NODE = NodeContext("a", (IP("192.168.0.2"), IP("127.0.0.1")))


def test_every_way_in_gets_a_frontend() -> None:
    plan = plan_service(outside_service(), [placed(("10.244.0.5", "a"))], NODE)
    kinds = {(str(k.address), k.port): fe.kind for k, fe in plan.items()}
    assert kinds == {
        ("10.96.0.10", 80): "ClusterIP",
        ("192.168.0.2", 30080): "NodePort",
        ("127.0.0.1", 30080): "NodePort",
        ("192.0.2.50", 80): "ExternalIP",
        ("203.0.113.9", 80): "LoadBalancer",  # the IPv6 ingress waits for IPv6 support
    }
    ranged = {str(k.address) for k, fe in plan.items() if fe.source_ranges}
    assert ranged == {"203.0.113.9"}  # only the LoadBalancer IP checks sources
    assert not any(fe.local for fe in plan.values())


def test_local_policy_adds_an_outside_twin_with_this_nodes_backends() -> None:
    where = placed(("10.244.0.5", "a"), ("10.244.1.5", "b"))
    plan = plan_service(outside_service("Local"), [where], NODE)
    twin = plan[FrontendKey(IP("192.168.0.2"), 30080, Protocol.TCP, SCOPE_EXTERNAL)]
    assert [str(b.address) for b in twin.backends] == ["10.244.0.5"]
    assert twin.local and not twin.drop_empty
    main = plan[FrontendKey(IP("192.168.0.2"), 30080, Protocol.TCP)]
    assert main.local and len(main.backends) == 2
    assert FrontendKey(IP("10.96.0.10"), 80, Protocol.TCP, SCOPE_EXTERNAL) not in plan
    # endpoints only elsewhere: drop; none at all: reject (no drop flag)
    remote = plan_service(outside_service("Local"), [placed(("10.244.1.5", "b"))], NODE)
    assert remote[twin.key].drop_empty and not remote[twin.key].backends
    empty = plan_service(outside_service("Local"), [], NODE)
    assert not empty[twin.key].drop_empty


def test_new_node_addresses_replan_only_services_with_node_ports() -> None:
    table = ServiceTable()
    table.set_service(outside_service())
    table.set_service(svc("10.96.0.20", ServiceRef("ns", "plain")))
    planner = Planner()
    planner.update(table, list(table.services))
    change = planner.set_node(table, NodeContext("a", (IP("192.168.0.3"),)))
    assert {fe.service for fe in change.upserts} == {REF}
    assert {str(fe.key.address) for fe in change.upserts} == {"192.168.0.3"}
    assert planner.set_node(table, NodeContext("a", (IP("192.168.0.3"),))).upserts == []


def test_an_ipv6_only_service_opens_no_ipv4_node_port() -> None:
    v6 = dataclasses.replace(outside_service(), cluster_ips=(IP("fd00::10"),))
    plan = plan_service(v6, [], NODE)
    assert not [k for k, fe in plan.items() if fe.kind == "NodePort"]


# -- which endpoints are eligible (kube-proxy's CategorizeEndpoints) -----------------

VIP = FrontendKey(IP("10.96.0.10"), 80, Protocol.TCP)
HERE = NodeContext("here", zone="zone-a")


def ep(
    address: str,
    state: str = "ready",
    node: str = "here",
    hints: tuple[str, ...] = (),
    weight: int = 1,
) -> Endpoint:
    """state: ready, terminating (serving and terminating) or gone (neither)."""
    return Endpoint(
        (IP(address),),
        ready=state == "ready",
        serving=state != "gone",
        terminating=state != "ready",
        node_name=node,
        zone_hints=hints,
        weight=weight,
    )


def web(*endpoints: Endpoint, name: str = "web-1") -> EndpointSlice:
    return EndpointSlice(
        "ns", name, "web", "IPv4", (EndpointPort("http", Protocol.TCP, 8080),), endpoints
    )


def http_service(**fields: Any) -> Service:
    base = Service(
        ref=REF,
        type="ClusterIP",
        cluster_ips=(IP("10.96.0.10"),),
        ports=(ServicePort("http", Protocol.TCP, 80),),
    )
    return dataclasses.replace(base, **fields)


def addresses(svc: Service, *endpoints: Endpoint, node: NodeContext = HERE) -> list[str]:
    return [str(b.address) for b in plan_service(svc, [web(*endpoints)], node)[VIP].backends]


def test_only_ready_endpoints_while_any_is_ready() -> None:
    got = addresses(
        http_service(),
        ep("10.0.0.1"),
        ep("10.0.0.2", "terminating"),
        ep("10.0.0.3", "gone"),
        ep("10.0.0.4", node="other"),
    )
    assert got == ["10.0.0.1", "10.0.0.4"]


def test_serving_terminating_endpoints_when_none_is_ready() -> None:
    backends = plan_service(
        http_service(),
        [
            web(
                ep("10.0.0.2", "terminating", "other"),
                ep("10.0.0.3", "gone"),
                ep("10.0.0.4", "terminating"),
            )
        ],
        HERE,
    )[VIP].backends
    # never the terminating endpoint that no longer serves
    assert [str(b.address) for b in backends] == ["10.0.0.2", "10.0.0.4"]
    assert all(b.serving and b.terminating and not b.ready for b in backends)


def test_terminating_fallback_is_abandoned_as_soon_as_one_is_ready() -> None:
    table = ServiceTable()
    planner = Planner()
    planner.node = HERE
    table.set_service(http_service())
    planner.update(
        table, table.set_slice(web(ep("10.0.0.2", "terminating"), ep("10.0.0.3", "terminating")))
    )
    change = planner.update(
        table,
        table.set_slice(
            web(ep("10.0.0.2", "terminating"), ep("10.0.0.3", "terminating"), ep("10.0.0.9"))
        ),
    )
    assert [[str(b.address) for b in fe.backends] for fe in change.upserts] == [["10.0.0.9"]]


def test_only_non_serving_endpoints_reject() -> None:
    fe = plan_service(http_service(), [web(ep("10.0.0.3", "gone"))], HERE)[VIP]
    assert not fe.backends and not fe.drop_empty


def test_the_same_endpoint_in_two_slices_counts_where_it_is_ready() -> None:
    old = web(ep("10.0.0.1", "terminating"), name="web-a")
    new = web(ep("10.0.0.1"), name="web-b")
    for order in ([old, new], [new, old]):
        (backend,) = plan_service(http_service(), order, HERE)[VIP].backends
        assert backend.ready and not backend.terminating


def test_internal_policy_local_keeps_this_nodes_endpoints() -> None:
    local = http_service(internal_traffic_policy="Local")
    fe = plan_service(local, [web(ep("10.0.0.1"), ep("10.0.0.2", node="other"))], HERE)[VIP]
    assert [str(b.address) for b in fe.backends] == ["10.0.0.1"]
    assert not fe.drop_empty and not fe.local
    # a terminating local endpoint serves when no local one is ready, even with
    # ready endpoints elsewhere
    fe = plan_service(
        local, [web(ep("10.0.0.1", "terminating"), ep("10.0.0.2", node="other"))], HERE
    )[VIP]
    assert [str(b.address) for b in fe.backends] == ["10.0.0.1"]


def test_internal_policy_local_drops_when_endpoints_are_elsewhere_and_rejects_without_any() -> None:
    local = http_service(internal_traffic_policy="Local")
    elsewhere = plan_service(local, [web(ep("10.0.0.2", node="other"))], HERE)[VIP]
    assert not elsewhere.backends and elsewhere.drop_empty
    terminating = plan_service(local, [web(ep("10.0.0.2", "terminating", "other"))], HERE)[VIP]
    assert terminating.drop_empty
    for slices in ([], [web(ep("10.0.0.2", "gone", "other"))]):
        nothing = plan_service(local, slices, HERE)[VIP]
        assert not nothing.backends and not nothing.drop_empty  # rejects


def test_internal_policy_local_applies_to_cluster_ips_only() -> None:
    svc = dataclasses.replace(outside_service(), internal_traffic_policy="Local")
    plan = plan_service(svc, [placed(("10.244.0.5", "a"), ("10.244.1.5", "b"))], NODE)
    sizes = {fe.kind: len(fe.backends) for fe in plan.values()}
    assert sizes == {"ClusterIP": 1, "NodePort": 2, "ExternalIP": 2, "LoadBalancer": 2}


def test_external_policy_local_drops_only_when_an_endpoint_is_usable_elsewhere() -> None:
    twin = FrontendKey(IP("192.168.0.2"), 30080, Protocol.TCP, SCOPE_EXTERNAL)
    svc = outside_service("Local")

    def slice_of(state: str) -> EndpointSlice:
        return dataclasses.replace(placed(), endpoints=(ep("10.244.1.5", state, "b"),))

    assert plan_service(svc, [slice_of("terminating")], NODE)[twin].drop_empty
    assert not plan_service(svc, [slice_of("gone")], NODE)[twin].drop_empty
    # this node's terminating endpoints serve outside clients when none here is ready
    mixed = dataclasses.replace(
        placed(), endpoints=(ep("10.244.0.5", "terminating", "a"), ep("10.244.1.5", "ready", "b"))
    )
    plan = plan_service(svc, [mixed], NODE)
    assert [str(b.address) for b in plan[twin].backends] == ["10.244.0.5"]
    assert [str(b.address) for b in plan[VIP].backends] == ["10.244.1.5"]


def test_topology_hints_keep_the_zones_endpoints() -> None:
    got = addresses(
        http_service(),
        ep("10.0.0.1", hints=("zone-a",)),
        ep("10.0.0.2", hints=("zone-b",)),
        ep("10.0.0.3", hints=("zone-b", "zone-a")),
        ep("10.0.0.4", "terminating"),  # not ready: its missing hint does not matter
    )
    assert got == ["10.0.0.1", "10.0.0.3"]


def test_topology_is_not_used_when_one_ready_endpoint_lacks_a_hint() -> None:
    got = addresses(http_service(), ep("10.0.0.1", hints=("zone-a",)), ep("10.0.0.2"))
    assert got == ["10.0.0.1", "10.0.0.2"]


def test_topology_is_not_used_on_a_node_without_a_zone() -> None:
    hinted = (ep("10.0.0.1", hints=("zone-a",)), ep("10.0.0.2", hints=("zone-b",)))
    assert addresses(http_service(), *hinted, node=NodeContext("here")) == ["10.0.0.1", "10.0.0.2"]


def test_topology_is_not_used_when_no_endpoint_is_hinted_for_the_zone() -> None:
    hinted = (ep("10.0.0.1", hints=("zone-b",)), ep("10.0.0.2", hints=("zone-c",)))
    assert addresses(http_service(), *hinted) == ["10.0.0.1", "10.0.0.2"]


def test_topology_does_not_restrict_the_terminating_fallback_or_local_endpoints() -> None:
    assert addresses(
        http_service(),
        ep("10.0.0.1", "terminating", hints=("zone-b",)),
        ep("10.0.0.2", "terminating"),
    ) == ["10.0.0.1", "10.0.0.2"]
    hinted = (ep("10.0.0.1", hints=("zone-b",)), ep("10.0.0.2", node="other", hints=("zone-a",)))
    local = http_service(internal_traffic_policy="Local")
    assert addresses(local, *hinted) == ["10.0.0.1"]


def test_a_new_zone_replans_and_a_new_name_replans_local_policies() -> None:
    table = ServiceTable()
    table.set_service(http_service())
    table.set_slice(
        web(ep("10.0.0.1", hints=("zone-a",)), ep("10.0.0.2", node="b", hints=("zone-b",)))
    )
    other = ServiceRef("ns", "plain")
    table.set_service(svc("10.96.0.20", other))
    planner = Planner()
    planner.update(table, list(table.services))
    assert len(planner.plans[REF][VIP].backends) == 2
    change = planner.set_node(table, NodeContext("here", zone="zone-b"))
    assert [[str(b.address) for b in fe.backends] for fe in change.upserts] == [["10.0.0.2"]]
    table.set_service(http_service(internal_traffic_policy="Local"))
    planner.update(table, [REF])
    renamed = planner.set_node(table, NodeContext("b", zone="zone-b"))
    assert [str(b.address) for fe in renamed.upserts for b in fe.backends] == ["10.0.0.2"]


# -- schedulers, session affinity, weights ------------------------------------------


def test_scheduler_from_the_annotation_else_the_default() -> None:
    plain = plan_service(http_service(), [], HERE, "maglev")[VIP]
    assert plain.scheduler == "maglev"
    assert plan_service(http_service(), [], HERE)[VIP].scheduler == "random"
    own = plan_service(http_service(scheduler="rr"), [], HERE, "maglev")
    assert own[VIP].scheduler == "rr"
    every = plan_service(dataclasses.replace(outside_service("Local"), scheduler="sh"), [], NODE)
    assert {fe.scheduler for fe in every.values()} == {"sh"} and len(every) == 9


def test_a_new_default_scheduler_replans_the_services_without_their_own() -> None:
    table = ServiceTable()
    own = ServiceRef("ns", "own")
    table.set_service(http_service())
    table.set_service(dataclasses.replace(svc("10.96.0.20", own), scheduler="lc"))
    planner = Planner("random")
    planner.update(table, list(table.services))
    change = planner.set_scheduler(table, "wrr")
    assert {(fe.service, fe.scheduler) for fe in change.upserts} == {(REF, "wrr")}
    assert planner.plans[own][FrontendKey(IP("10.96.0.20"), 80, Protocol.TCP)].scheduler == "lc"
    assert not planner.set_scheduler(table, "wrr")


def test_client_ip_affinity_sets_the_timeout_on_every_frontend() -> None:
    sticky = dataclasses.replace(
        outside_service("Local"), session_affinity="ClientIP", affinity_timeout_s=600
    )
    plan = plan_service(sticky, [], NODE)
    assert {fe.affinity_timeout for fe in plan.values()} == {600}
    assert {fe.affinity_timeout for fe in plan_service(outside_service(), [], NODE).values()} == {0}


def test_backends_carry_their_endpoints_weight() -> None:
    fe = plan_service(http_service(), [web(ep("10.0.0.1", weight=3), ep("10.0.0.2"))], HERE)[VIP]
    assert [(str(b.address), b.weight) for b in fe.backends] == [("10.0.0.1", 3), ("10.0.0.2", 1)]
    # a weight change is a change of the frontend
    again = plan_service(http_service(), [web(ep("10.0.0.1", weight=4), ep("10.0.0.2"))], HERE)
    assert again[VIP] != fe


def test_the_default_scheduler_is_a_validated_setting_and_flag() -> None:
    from lbctl.agent import config
    from lbctl.cli import main as cli

    head = {"apiVersion": config.API_VERSION, "kind": config.KIND}
    assert config.parse(head, "f").scheduler == "random"
    assert config.parse({**head, "scheduler": "maglev"}, "f").scheduler == "maglev"
    with pytest.raises(
        config.ConfigError,
        match=re.escape(
            "f: scheduler: unknown scheduler 'fast'; set scheduler: one of "
            "random, rr, wrr, maglev, sh, lc"
        ),
    ):
        config.parse({**head, "scheduler": "fast"}, "f")
    args = cli._parser().parse_args(["run", "--manifests", "/m", "--scheduler", "lc"])
    assert args.scheduler == "lc"
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["run", "--scheduler", "fast"])
