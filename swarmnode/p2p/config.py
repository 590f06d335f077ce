"""Typed configuration and the delivered-message record of the p2p transport."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import multiaddr

# py-libp2p drops pubsub frames over 1 MiB (its DefaultMaxMessageSize) silently; keep gossip well under it
# and send anything larger as a manifest plus a blob pull over a direct stream.
LIBRARY_FRAME_LIMIT = 1 << 20


@dataclass(kw_only=True, slots=True)
class HostConfig:
    data_dir: Path
    listen_host: str = "127.0.0.1"
    port: int = 0
    bootstrap: list[str] = field(default_factory=list)
    target_peers: int = 8
    enable_dht: bool = True
    enable_mdns: bool = False
    max_message_bytes: int = 512 * 1024
    max_blob_bytes: int = 1 << 30
    # Circuit relay v2: a node that finds itself publicly reachable relays for NATed peers within these
    # bounds; a node behind NAT keeps `relay_reservations` slots on relaying peers.
    relay_service: bool = True
    relay_max_reservations: int = 32
    relay_max_circuits: int = 16
    relay_max_circuit_bytes: int = 1 << 30
    relay_max_circuit_s: int = 3600
    relay_reservations: int = 2
    # DCUtR: try to replace a relayed connection by a hole-punched direct one.
    hole_punching: bool = True

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"HostConfig.port must be in [0, 65535], got {self.port}")
        if not self.listen_host:
            raise ValueError("HostConfig.listen_host must be a non-empty IP address")
        if self.target_peers < 1:
            raise ValueError(f"HostConfig.target_peers must be >= 1, got {self.target_peers}")
        # Leave room for the pubsub envelope (signature, key, seqno, topic) inside the library frame.
        if not 1 <= self.max_message_bytes <= LIBRARY_FRAME_LIMIT - 4096:
            raise ValueError(
                f"HostConfig.max_message_bytes must be in [1, {LIBRARY_FRAME_LIMIT - 4096}], "
                f"got {self.max_message_bytes}"
            )
        for name in (
            "relay_max_reservations",
            "relay_max_circuits",
            "relay_max_circuit_bytes",
            "relay_max_circuit_s",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"HostConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.relay_reservations < 0:
            raise ValueError(f"HostConfig.relay_reservations must be >= 0, got {self.relay_reservations}")
        if self.max_blob_bytes < 1:
            raise ValueError(f"HostConfig.max_blob_bytes must be >= 1, got {self.max_blob_bytes}")
        for addr in self.bootstrap:
            try:
                parsed = multiaddr.Multiaddr(addr)
                parsed.value_for_protocol("p2p")
            except Exception as exc:
                raise ValueError(
                    f"HostConfig.bootstrap entry {addr!r} is not a full multiaddr ending in /p2p/<peer id>: {exc}"
                ) from exc


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    origin: str  # base58 peer id of the signer (the original publisher, not the forwarder)
    data: bytes
    received_at: float
