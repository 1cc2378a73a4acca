"""`__all__` is the contract: this pins it."""

import cpkv
import cpkv.cp
import cpkv.kernels
import cpkv.parallel
import cpkv.staging
import cpkv.transfer


def test_top_level_api():
    assert sorted(cpkv.__all__) == ["ComponentSpec", "PackedFormat", "PagedKVCache",
                                    "__version__"]


def test_kernels_api():
    assert sorted(cpkv.kernels.__all__) == ["pack_pages", "packed_digest", "reorganize_pages",
                                            "unpack_pages"]


def test_cp_api():
    assert sorted(cpkv.cp.__all__) == ["GatherDone", "GatherTimeoutError", "SenderPolicy",
                                       "SplitPlan", "all_gather_kv", "chunk_share", "gather_nbytes",
                                       "interleave_split", "page_share", "pages_sent_by",
                                       "split_token_map", "zigzag_split"]


def test_parallel_api():
    assert sorted(cpkv.parallel.__all__) == ["DcpLayout", "DcpSelection", "LAYER_GROUP_BYTES",
                                             "ParallelRank", "ParallelSizes", "balanced_split",
                                             "dcp_heads_of", "dcp_rank_of", "dcp_select",
                                             "head_shard", "heads_of", "is_first_holder",
                                             "layer_groups", "layers_of", "tokens_of_pages"]


def test_staging_api():
    assert sorted(cpkv.staging.__all__) == ["ALIGN", "ArenaError", "ArenaFullError", "Slot",
                                            "StagingArena"]


def test_transfer_api():
    assert sorted(cpkv.transfer.__all__) == ["CostModel", "KVReceiver", "KVSender",
                                             "KVStatus", "ModelSpec", "ParallelRank",
                                             "ParallelSizes", "ProtocolError", "Route",
                                             "StatusCell", "TransferEngine", "TransferError",
                                             "agree", "contiguous_runs", "map_ranks"]


def test_every_exported_name_exists():
    for mod in (cpkv, cpkv.cp, cpkv.kernels, cpkv.parallel, cpkv.staging, cpkv.transfer):
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"
