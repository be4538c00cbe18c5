"""The plan: frontends and eligible backends from the model (pure)."""

from __future__ import annotations

import ipaddress

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
from lbctl.plan import FrontendKey, Planner, plan_service

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
