"""Persistent Ed25519 identity: the same peer id across restarts."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity

KEY_FILE = "identity.key"


def load_or_create_identity(data_dir: Path) -> KeyPair:
    """Load `data_dir/identity.key`, creating it (mode 0600) on first start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / KEY_FILE
    if path.exists():
        try:
            return load_identity(path)
        except ValueError as exc:
            raise ValueError(
                f"identity key {path} is corrupt ({exc}); move it away to start with a new peer id"
            ) from exc
    key_pair = create_new_key_pair()
    # Write to a temp file then rename so a crash never leaves a half-written key behind.
    tmp = path.with_suffix(".tmp")
    save_identity(key_pair, tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key_pair
