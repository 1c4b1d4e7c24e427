"""Node-shared tiers: several engines of one node use one CPU pool and one SSD store.

* `CacheOwner` (``flexkv serve``, `owner`): the process that holds the tiers (a `TieredCache`) and serves
  the engines' sessions at ``FLEXKV_SERVER_RECV_PORT``.
* `SharedCache` (`client`): what an engine with ``FLEXKV_SHARE_SERVER=1`` uses instead of its own
  `TieredCache`: local lookups on a mirror of the owner's index, one round trip per load or store, and
  the shared blocks announced as the engine's own tiers so the router credits every engine of the node.
* `TierMirror` (`mirror`): that mirror.
"""

from .client import SharedCache
from .mirror import TierMirror
from .owner import CacheOwner

__all__ = ["CacheOwner", "SharedCache", "TierMirror"]
