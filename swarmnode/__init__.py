"""swarmnode: decentralized RL post-training of language models over libp2p."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("swarmnode")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
