"""One exchange per collaboration channel: rollouts (SAPO), DeMo components, DiLoCo rounds.

Each exchange owns its topic(s), its codec and its counters, and is driven by the node through the
``Exchange`` protocol in ``base``; none of them imports the node.
"""

from swarmnode.exchange.base import Exchange, Traffic, receive_loop

__all__ = ["Exchange", "Traffic", "receive_loop"]
