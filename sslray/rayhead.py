"""Which Ray cluster a plain ``ray.init()`` joins on this machine, and whether that head is alive.

With no address and no ``RAY_ADDRESS``, ``ray.init()`` joins the head named in
``<ray temp dir>/ray_current_cluster``, the file the last ``ray start`` on this machine wrote
(``ray stop`` removes it). A head that was killed instead of stopped leaves the file behind, and
``ray.init()`` then waits on its dead GCS with no message. These helpers let ``sslray`` name the
file and go on with a local instance, and ``sslray doctor`` report it.
"""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Optional


def tcp_open(host: str, port: int, timeout: float) -> Optional[str]:
    """None when something listens at host:port, else why not (refused, timed out, unknown host)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or f"{type(e).__name__}: {e}"


def address_file() -> str:
    """Ray's own path for the file (``$RAY_TMPDIR``/``$TMPDIR``/``/tmp`` + ``ray/ray_current_cluster``)."""
    try:
        from ray._common.utils import get_ray_address_file
        return get_ray_address_file(None)
    except Exception:  # noqa: BLE001 - a private Ray helper; mirror its rule if it moves
        tmp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
        return os.path.join(tmp or "/tmp", "ray", "ray_current_cluster")


@dataclass
class LocalHead:
    file: str       # the ray_current_cluster file
    address: str    # host:port of the GCS it names
    dead: Optional[str]  # None when the GCS answers, else why not


def local_head(timeout: float = 2.0) -> Optional[LocalHead]:
    """The head a plain ``ray.init()`` would join, or None when it would start its own instance."""
    path = address_file()
    try:
        with open(path) as f:
            address = f.read().strip()
    except OSError:
        return None
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        dead = tcp_open(host.strip("[]") or "127.0.0.1", int(port), timeout)  # [v6]:port
    except ValueError:
        dead = f"not a host:port address: {address!r}"
    return LocalHead(path, address, dead)


def stale_message(head: LocalHead) -> str:
    return (f"{head.file} names a Ray head at {head.address} that does not answer ({head.dead}): a head "
            "started with `ray start` and killed without `ray stop` leaves this file behind, and a plain "
            "ray.init() waits on it. Run `ray stop` on this machine to remove it.")
