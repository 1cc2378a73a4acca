"""The KV store tier on Mooncake Store: hash-chain keys with CP/TP/PP rules, CP-share writers,
prefix hits agreed across groups, and an embedded `mooncake_master` as the default."""

from .keys import is_store_writer, page_hashes, page_keys, value_geometry
from .master import MasterError, MasterProcess, find_master_binary
from .store import KVStore, LoadResult, PutResult, StoreError

__all__ = ["KVStore", "LoadResult", "MasterError", "MasterProcess", "PutResult", "StoreError",
           "find_master_binary", "is_store_writer", "page_hashes", "page_keys",
           "value_geometry"]
