"""Gossip topic names and stream protocol ids.

Topics are namespaced by swarm id so that several swarms can share peers (and bootstrap nodes)
without seeing each other's traffic: `/swarmnode/<swarm>/<kind>/<version>`. Cohort topics (DeMo
components, round manifests) add the model fingerprint, so only nodes training the same model
subscribe to them: `/swarmnode/<swarm>/<kind>/<fingerprint>/<version>`.
"""

from __future__ import annotations

import re

from swarmnode.protocol.errors import ProtocolError
from swarmnode.protocol.records import FINGERPRINT_RE, SWARM_RE

# Direct streams: anything over ~512 KB is pulled by content hash rather than gossiped.
BLOB_PROTOCOL = "/swarmnode/blob/1.0.0"
# Catch-up for joiners: the latest state manifest of a cohort.
STATE_PROTOCOL = "/swarmnode/state/1.0.0"

# Topic kinds used by the daemon; topic() accepts any kind matching KIND_RE.
PRESENCE = "presence"
ROLLOUTS = "rollouts"
DEMO = "demo"
ROUNDS = "rounds"
STATE = "state"

KIND_RE = re.compile(r"[a-z0-9-]{1,32}")
VERSION_RE = re.compile(r"[0-9]{1,4}")


def validate_swarm_id(swarm_id: str) -> str:
    """Return `swarm_id` if valid (lowercase letters, digits, '-', 1-64 chars), else raise."""
    if not isinstance(swarm_id, str) or SWARM_RE.fullmatch(swarm_id) is None:
        raise ProtocolError(
            f"swarm id {swarm_id!r:.80} is invalid: use 1-64 characters from a-z, 0-9 and '-'"
        )
    return swarm_id


def _check(value: str, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise ProtocolError(f"topic {what} {value!r:.80} is invalid: expected {pattern.pattern}")
    return value


def topic(swarm_id: str, kind: str, version: str = "1") -> str:
    """The swarm-wide gossip topic for `kind`, e.g. topic("demo-1", ROLLOUTS)."""
    validate_swarm_id(swarm_id)
    _check(kind, KIND_RE, "kind")
    _check(version, VERSION_RE, "version")
    return f"/swarmnode/{swarm_id}/{kind}/{version}"


def cohort_topic(swarm_id: str, kind: str, fingerprint: str, version: str = "1") -> str:
    """The topic for `kind` restricted to one cohort (nodes with model fingerprint `fingerprint`)."""
    validate_swarm_id(swarm_id)
    _check(kind, KIND_RE, "kind")
    _check(fingerprint, FINGERPRINT_RE, "fingerprint")
    _check(version, VERSION_RE, "version")
    return f"/swarmnode/{swarm_id}/{kind}/{fingerprint}/{version}"
