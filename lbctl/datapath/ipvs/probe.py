"""Whether this node can run the IPVS datapath: IPVS over generic netlink, and nft.

`--mode auto` asks it when the eBPF datapath cannot run (lbctl/datapath/ebpf/probe.py),
`--mode ipvs` before it starts.
"""

from __future__ import annotations

import errno
import os
import shutil

from lbctl.datapath import Probe


def probe_ipvs() -> Probe:
    """IPVS over generic netlink, and nft for the table beside it."""
    from pyroute2 import IPVS
    from pyroute2.netlink.exceptions import NetlinkError

    out = Probe()
    try:
        ipvs = IPVS()
    except NetlinkError as err:
        if err.code in (errno.ENOENT, errno.EPROTONOSUPPORT):
            out.missing = (
                "IPVS: the kernel has no generic netlink family IPVS (CONFIG_IP_VS; "
                "as a module: `modprobe ip_vs`)"
            )
        else:
            out.missing = f"IPVS: opening its generic netlink family failed: {err}"
        return out
    try:
        list(ipvs.service("dump"))
    except NetlinkError as err:
        out.missing = f"IPVS: listing virtual services failed: {os.strerror(err.code)}" + (
            " (the agent needs CAP_NET_ADMIN)" if err.code == errno.EPERM else ""
        )
        return out
    finally:
        ipvs.close()
    out.checked.append("IPVS generic netlink family")
    if shutil.which("nft") is None:
        out.missing = "nft: not found in PATH (install the nftables package)"
        return out
    out.checked.append("nft")
    return out
