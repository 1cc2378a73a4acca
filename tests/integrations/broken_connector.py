"""A cpkv connector with a deliberately broken transfer for some requests, loaded by vLLM from
this module path in the end-to-end test (as the prefill engine's connector).

Requests whose transfer id is at least ``BROKEN`` have their blocks shipped in reverse order:
the transfer succeeds with every byte in the wrong place, and the test shows their tokens then
differ from a single engine's, i.e. that the end-to-end check can fail. Every other request
goes through the production connector and transport unchanged.
"""

from cpkv.integrations.transport import KVTransport
from cpkv.integrations.vllm import CpkvConnector

BROKEN = 1 << 62  # examples/vllm_proxy.new_transfer_id draws below this


class _ReversingTransport(KVTransport):
    def send_layers(self, rid, transfer_id, peer, page_ids, num_tokens, upto, ready=None):
        if transfer_id >= BROKEN:
            page_ids = page_ids.flip(0)
        super().send_layers(rid, transfer_id, peer, page_ids, num_tokens, upto, ready=ready)


class BrokenCpkvConnector(CpkvConnector):
    def make_transport(self, cache, serve):
        return _ReversingTransport(cache, serve=serve, timeout=self.timeout,
                                   arena_bytes=self.arena_bytes)
