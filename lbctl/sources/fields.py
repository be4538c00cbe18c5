"""Reading one field of an untrusted Kubernetes object: types, names, addresses, ports.

The parsers (lbctl/sources/parse.py) read manifests anyone can write and API
objects a buggy controller may have stored, so every value is checked for
its type before it is used, and every error message shows a value through
`show`, which is bounded: a YAML alias bomb (a list of nine lists of nine
lists...) or a 10,000-digit number costs an error line, not the agent.

Names follow the API's rules (RFC 1123 and RFC 1035 labels), because lbctl
keys its maps, logs and metrics by them.  IPv4 addresses follow Kubernetes'
own parser (netutils.ParseIPSloppy): an octet with leading zeros is read as
decimal, so 010.1.2.3 is 10.1.2.3, as kube-proxy reads it, never octal; the
object's log line says so once per version.
"""

from __future__ import annotations

import contextvars
import ipaddress
import re
import reprlib
import socket
from collections.abc import Mapping
from typing import Any

from lbctl.model import IPAddress, Protocol


class InvalidObject(ValueError):
    """An object lbctl cannot use; the message says which field and why."""


class _Bounded(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 64:  # repr() itself refuses integers of over 4300 digits
            return f"<an integer of {x.bit_length()} bits>"
        return repr(x)


_SHOW = _Bounded()
_SHOW.maxstring = 80
_SHOW.maxother = 80
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = _SHOW.maxset = 4
_SHOW.maxlevel = 2


def show(value: Any) -> str:
    """A value for an error message: its repr, cut short whatever its size or depth."""
    return _SHOW.repr(value)


def kind_of(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def mapping(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidObject(f"{field}: expected a mapping, got {kind_of(value)}")
    return value


def listing(value: Any, field: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidObject(f"{field}: expected a list, got {kind_of(value)}")
    return value


def text(value: Any, field: str, default: str | None = None) -> str:
    """A string field; `default` when it is absent (or empty), if there is one."""
    if default is not None and (value is None or value == ""):
        return default
    if not isinstance(value, str):
        raise InvalidObject(f"{field}: expected a string, got {kind_of(value)} {show(value)}")
    return value


def optional_text(value: Any, field: str) -> str | None:
    return None if value is None else text(value, field)


def flag(value: Any, field: str, default: bool) -> bool:
    """A boolean field: true or false, not "false" (which Python would call true)."""
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidObject(f"{field}: expected true or false, got {kind_of(value)} {show(value)}")
    return value


def string_map(value: Any, field: str) -> dict[str, str]:
    """Labels or annotations: strings to strings, as the API stores them."""
    out = {}
    for key, item in mapping(value, field).items():
        if not isinstance(key, str):
            raise InvalidObject(f"{field}: the key {show(key)} is not a string")
        if not isinstance(item, str):
            shown = key if len(key) <= 80 and key.isprintable() else show(key)
            raise InvalidObject(f"{field}[{shown}]: expected a string, got {kind_of(item)}")
        out[key] = item
    return out


# -- names ---------------------------------------------------------------------------

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_LABEL = re.compile(_LABEL)
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_RULES = {
    "label": (_DNS1123_LABEL, 63, "lower-case letters, digits and '-', starting and ending "
              "with a letter or digit, at most 63 characters (an RFC 1123 label)"),
    "service": (_DNS1035_LABEL, 63, "lower-case letters, digits and '-', starting with a "
                "letter and ending with a letter or digit, at most 63 characters "
                "(an RFC 1035 label)"),
    "subdomain": (_DNS1123_SUBDOMAIN, 253, "lower-case RFC 1123 labels joined by '.', at "
                  "most 253 characters"),
}  # fmt: skip


def name(value: Any, field: str, rule: str) -> str:
    """A name as the API allows it: `rule` is label, service or subdomain."""
    found = text(value, field)
    pattern, longest, what = _RULES[rule]
    if len(found) > longest or not pattern.fullmatch(found):
        raise InvalidObject(f"{field}: {show(found)} is not a valid name: use {what}")
    return found


def port_name(value: Any, field: str) -> str:
    """A port's name: empty, or an RFC 1123 label as the API requires."""
    found = text(value, field, default="")
    return name(found, field, "label") if found else ""


# -- addresses and ports ----------------------------------------------------------------

# Lenient readings of the object being parsed (an IPv4 address with leading
# zeros), for its log line: see `parse_checked` in lbctl/sources/parse.py.
notes: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("notes", default=None)


def _sloppy_ipv4(value: str) -> ipaddress.IPv4Address | None:
    """Kubernetes' reading of dotted decimal with leading zeros (ParseIPSloppy): decimal."""
    parts = value.split(".")
    if len(parts) != 4 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    octets = [p.lstrip("0") or "0" for p in parts]
    if any(len(o) > 3 or int(o) > 255 for o in octets):
        return None
    return ipaddress.IPv4Address(".".join(octets))


def ip(value: Any, field: str) -> IPAddress:
    if isinstance(value, str):
        try:  # the common case, four times faster than ipaddress' own parser, as strict
            return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, value))
        except (OSError, ValueError):  # ValueError: a NUL in the text
            pass
        try:
            found = ipaddress.ip_address(value)
            if not (isinstance(found, ipaddress.IPv6Address) and found.scope_id):
                return found  # a zone (fe80::1%eth0) is no Service's or Pod's address
        except ValueError:
            pass
        sloppy = _sloppy_ipv4(value)
        if sloppy is not None:
            noted = notes.get()
            if noted is not None:
                noted.append(
                    f"{field}: {value!r} has leading zeros: read as {sloppy} (decimal, as "
                    "Kubernetes reads it, not octal); write it without them"
                )
            return sloppy
    raise InvalidObject(f"{field}: {show(value)} is not a valid IP address")


def network(
    value: Any, field: str, example: str = "203.0.113.0/24"
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR such as 203.0.113.0/24; surrounding blanks are tolerated, as kube-proxy
    tolerates them; host bits set are refused, as the API refuses them."""
    raw = text(value, field).strip()
    address, slash, length = raw.partition("/")
    try:
        if ":" not in address:
            address = str(ip(address, field))  # leading zeros, as for addresses
        return ipaddress.ip_network(f"{address}{slash}{length}")
    except (ValueError, InvalidObject):
        raise InvalidObject(f"{field}: {show(raw)} is not a CIDR such as {example}") from None


def port(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidObject(f"{field}: {show(value)} is not a port number")
    if not 1 <= value <= 65535:
        raise InvalidObject(f"{field}: {show(value)} is out of range (1-65535)")
    return value


def protocol(value: Any, field: str) -> Protocol:
    if value is None:
        return Protocol.TCP
    if isinstance(value, str) and value in Protocol.__members__:
        return Protocol[value]
    raise InvalidObject(f"{field}: unknown protocol {show(value)} (expected TCP, UDP or SCTP)")
