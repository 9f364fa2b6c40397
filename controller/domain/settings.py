"""The controller's settings: one dataclass, a docstring per field, passed to ``ControllerService``."""

from __future__ import annotations

import math
from dataclasses import dataclass

KiB, MiB, GiB, TiB, PiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50


@dataclass(frozen=True)
class ControllerSettings:
    heartbeat_interval: float = 5.0
    """Seconds between an agent's heartbeats (told to agents when they register)."""

    heartbeat_timeout: float = 20.0
    """A node silent for longer than this is marked unhealthy: four missed heartbeats, so one
    slow or lost heartbeat (a GC pause, a busy controller) does not flap the node."""

    max_volume_bytes: int = PiB
    """Largest volume accepted.  1 PiB is far above any disk a node offers today, and low
    enough that a typo (an extra unit) is refused instead of overcommitting the pool."""

    volume_size_multiple: int = 512
    """Volume sizes must be a multiple of this: the logical block size of the LUNs."""

    max_overcommit_ratio: float = 100.0
    """Largest overcommit ratio a pool may have; beyond that a thin pool is a promise nobody keeps."""

    default_pool: str = "default"
    """Name of the pool over every disk of every node that the controller creates when it starts
    and the pool is missing (``shoal up`` relies on it); "" disables it."""

    chap_secret_bytes: int = 18
    """Random bytes in each per-volume CHAP secret (token_urlsafe: 24 characters, 144 bits;
    RFC 7143 §9.2.1 wants at least 96 bits outside IPsec, and initiators accept up to 255)."""

    chap_user_prefix: str = "shoal-"
    """CHAP user names are this prefix plus the volume id."""

    fence_grace: float = 0.0
    """A node silent for longer than this (seconds) is fenced by the controller's loop; 0 never fences
    on its own (``shoalctl node fence`` only).  Off by default: a fence cuts every VM disk of a host that
    may only be cut off from the controller, and must then be unfenced by hand, so it is a decision an
    admin makes with the cluster's failure modes in mind (oVirt and Proxmox also fence only when
    configured to).  When set, at least ``heartbeat_timeout`` (a node is unhealthy before it is fenced)."""

    def __post_init__(self) -> None:
        # None of the comparisons below refuses nan (agents told a nan interval heartbeat without a pause)
        for name in ("heartbeat_interval", "heartbeat_timeout", "fence_grace"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, not {getattr(self, name)!r}")
        if self.fence_grace < 0 or (self.fence_grace and self.fence_grace < self.heartbeat_timeout):
            raise ValueError("fence_grace must be 0 (never) or at least heartbeat_timeout")
        if self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must be longer than a positive heartbeat_interval")
        if self.chap_secret_bytes < 12:
            raise ValueError("chap_secret_bytes must be at least 12 (96 bits, RFC 7143 §9.2.1)")
