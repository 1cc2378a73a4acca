"""The KV store tier on Mooncake Store: hash-chain keys with CP/TP/PP rules, CP-share writers,
prefix hits agreed across groups, streaming prefix loads, and an embedded `mooncake_master` as
the default."""

from .keys import is_store_writer, page_hashes, page_keys, value_geometry
from .load import LoadResult, PrefixLoad, plan_layer_groups
from .master import MasterError, MasterProcess, find_master_binary
from .store import KVStore, PutResult, StoreError

__all__ = ["KVStore", "LoadResult", "MasterError", "MasterProcess", "PrefixLoad", "PutResult",
           "StoreError", "find_master_binary", "is_store_writer", "page_hashes", "page_keys",
           "plan_layer_groups", "value_geometry"]
