"""Which datapath this node can run: the BPF features lbctl needs, and IPVS.

`--mode auto` probes with real system calls, cheapest first, and stops at
the first thing missing, naming it and what the kernel answered:

1. the bpf() system call, allowed to this process (BPF_MAP_CREATE);
2. the map types the programs use (hash, array, percpu_array, lru_hash,
   lpm_trie);
3. the program types: sched_cls (tc), and xdp when --xdp asks for it (a
   two-instruction program loaded with BPF_PROG_LOAD);
4. the helpers the tc program calls, each in a one-call sched_cls program:
   the verifier says "invalid func" or "unknown func" for a helper the
   kernel lacks (bpftool's method);
5. attaching: a clsact qdisc and a cls_bpf filter on a veth pair made for the
   probe in the agent's namespace and deleted right after.  A refusal to make
   the veth (EPERM) is a missing CAP_NET_ADMIN (read from CapEff), not a
   kernel without veth: nothing could be attached, so the check fails.

The last check is the real one: compiling and loading lbctl's programs
(BpfDatapath.load), which the CLI does next and which falls back too when
it fails.  IPVS is probed by opening its generic netlink family, which also
loads the ip_vs module when the kernel has it as a module.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from lbctl.datapath import Probe

SYS_BPF = 321  # x86_64
BPF_MAP_CREATE, BPF_PROG_LOAD = 0, 5
BPF_F_NO_PREALLOC = 1
SCHED_CLS, XDP = 3, 6

# (name, BPF_MAP_TYPE_*, key size, value size, flags, max entries)
MAP_TYPES = (
    ("hash", 1, 4, 8, 0, 1),
    ("array", 2, 4, 8, 0, 1),
    ("percpu_array", 6, 4, 8, 0, 1),
    ("lru_hash", 9, 4, 8, 0, 1),
    ("lpm_trie", 11, 8, 4, BPF_F_NO_PREALLOC, 1),
    ("ringbuf", 27, 0, 0, 0, 4096),  # lb_events (Linux 5.8): a page at least
)
# The helpers the tc program calls (bpf/*.h), by their uapi number.
HELPERS = (
    ("map_lookup_elem", 1),
    ("map_update_elem", 2),
    ("map_delete_elem", 3),
    ("ktime_get_ns", 5),
    ("get_prandom_u32", 7),
    ("skb_store_bytes", 9),
    ("l3_csum_replace", 10),
    ("l4_csum_replace", 11),
    ("redirect", 23),
    ("skb_load_bytes", 26),
    ("csum_diff", 28),
    ("skb_change_tail", 38),
    ("fib_lookup", 69),
    ("ringbuf_output", 130),
)
PROBE_LINK = "lbctl-probe0"  # the veth pair made (and deleted) by the attach probe


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> tuple[int, int]:
    """bpf(cmd, attr); (fd or -1, errno)."""
    ret = _libc.syscall(
        ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), attr, ctypes.c_uint(ctypes.sizeof(attr))
    )
    return int(ret), ctypes.get_errno() if ret < 0 else 0


def _errname(err: int) -> str:
    return errno.errorcode.get(err, str(err))


def create_map(
    map_type: int, key: int, value: int, flags: int = 0, entries: int = 1
) -> tuple[int, int]:
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIIII", attr, 0, map_type, key, value, entries, flags)
    return _bpf(BPF_MAP_CREATE, attr)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("=BBhi", code, (src << 4) | dst, off, imm)


MOV64_R0 = 0xB7  # r0 = imm
CALL, EXIT = 0x85, 0x95


def load_program(prog_type: int, insns: bytes) -> tuple[int, int, str]:
    """BPF_PROG_LOAD; (fd or -1, errno, the verifier's log)."""
    code = ctypes.create_string_buffer(insns, len(insns))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into(
        "=IIQQIIQ",
        attr,
        0,
        prog_type,
        len(insns) // 8,
        ctypes.addressof(code),
        ctypes.addressof(license_),
        1,
        len(log),
        ctypes.addressof(log),
    )
    fd, err = _bpf(BPF_PROG_LOAD, attr)
    return fd, err, log.value.decode(errors="replace")


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _permission(err: int) -> str:
    if err == errno.EPERM:
        return (
            " (not permitted: the agent needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, "
            "or CAP_SYS_ADMIN)"
        )
    if err == errno.ENOSYS:
        return " (the kernel is built without CONFIG_BPF_SYSCALL)"
    return ""


def probe_bpf(xdp: bool = False, attach: bool = True) -> Probe:
    """The BPF features lbctl's tc (and XDP) datapath needs, checked with real calls."""
    out = Probe()
    for name, kind, key, value, flags, entries in MAP_TYPES:
        fd, err = create_map(kind, key, value, flags, entries)
        _close(fd)
        if fd < 0:
            what = "bpf() system call" if not out.checked else f"BPF map type {name}"
            out.missing = f"{what}: bpf(BPF_MAP_CREATE) returned {_errname(err)}{_permission(err)}"
            return out
        if not out.checked:
            out.checked.append("bpf() system call")
        out.checked.append(f"map type {name}")
    types = [("sched_cls", SCHED_CLS, 0)] + ([("xdp", XDP, 2)] if xdp else [])
    for name, kind, verdict in types:
        fd, err, log = load_program(kind, _insn(MOV64_R0, imm=verdict) + _insn(EXIT))
        _close(fd)
        if fd < 0:
            why = f"; the verifier said: {_last(log)}" if log.strip() else ""
            out.missing = (
                f"BPF program type {name}: bpf(BPF_PROG_LOAD) returned "
                f"{_errname(err)}{_permission(err)}{why}"
            )
            return out
        out.checked.append(f"program type {name}")
    for name, number in HELPERS:
        fd, err, log = load_program(
            SCHED_CLS, _insn(CALL, imm=number) + _insn(MOV64_R0) + _insn(EXIT)
        )
        _close(fd)
        if "invalid func" in log or "unknown func" in log:
            out.missing = f"BPF helper bpf_{name} (#{number}) for sched_cls: {_last(log)}"
            return out
    out.checked.append(f"{len(HELPERS)} helpers of the tc program")
    if attach:
        problem = probe_attach()
        if problem is not None:
            out.missing = problem
            return out
        out.checked.append("clsact qdisc and cls_bpf filter")
    return out


def _last(log: str) -> str:
    lines = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith("processed ")]
    return lines[-1] if lines else ""


def probe_attach() -> str | None:
    """A clsact qdisc and a direct-action cls_bpf filter on a probe veth; None: both work."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    fd, err, _ = load_program(SCHED_CLS, _insn(MOV64_R0) + _insn(EXIT))
    if fd < 0:
        return f"BPF program type sched_cls: bpf(BPF_PROG_LOAD) returned {_errname(err)}"
    try:
        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname=PROBE_LINK, kind="veth", peer="lbctl-probe1")
            except NetlinkError as err2:
                if err2.code == errno.EPERM:
                    return _attach_refused()
                return None  # no veth here: attaching to the real interfaces will tell
            try:
                index = ipr.link_lookup(ifname=PROBE_LINK)[0]
                try:
                    ipr.tc("add", "clsact", index)
                except NetlinkError as err3:
                    return f"tc qdisc clsact: {os.strerror(err3.code)} (CONFIG_NET_SCH_INGRESS)"
                try:
                    ipr.tc(
                        "add-filter",
                        "bpf",
                        index,
                        ":1",
                        fd=fd,
                        name="lbctl_probe",
                        parent="ffff:fff2",
                        direct_action=True,
                    )
                except NetlinkError as err4:
                    return f"tc filter bpf: {os.strerror(err4.code)} (CONFIG_NET_CLS_BPF)"
            finally:
                ipr.link("del", ifname=PROBE_LINK)
    finally:
        os.close(fd)
    return None


def _attach_refused() -> str:
    """Creating the probe veth was refused (EPERM): the capability this process lacks."""
    from lbctl.datapath.ebpf.datapath import missing_capabilities

    if "CAP_NET_ADMIN" in missing_capabilities():
        why = (
            "this process lacks CAP_NET_ADMIN, which the agent needs to add clsact qdiscs "
            "and cls_bpf filters (grant it, as deploy/daemonset.yaml does)"
        )
    else:
        why = (
            "this process holds CAP_NET_ADMIN, so something else (a security module, "
            "seccomp) refuses"
        )
    return f"attaching: creating the probe veth {PROBE_LINK} was not permitted (EPERM): {why}"
