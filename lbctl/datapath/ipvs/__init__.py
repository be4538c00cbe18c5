"""The IPVS datapath: virtual services by netlink and the nftables table beside them."""
