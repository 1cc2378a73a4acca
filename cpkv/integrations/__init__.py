"""Runner connectors: the only modules of cpkv that import a model runner.

``cpkv.integrations.vllm`` is vLLM's out-of-tree KV connector (``CpkvConnector``, loaded by
``kv_connector_module_path="cpkv.integrations.vllm"``); it imports vLLM, so it is imported only
by vLLM itself (or a test in the vLLM lane), never by ``import cpkv``.
``cpkv.integrations.transport`` is what such a connector calls to move a request's pages (no
runner import): the one place that knows cpkv's transfer API.
"""
