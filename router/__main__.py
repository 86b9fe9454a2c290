"""python -m router [--model M] [--port 8000] [--control-port 8100]: the cluster's OpenAI-compatible front door.

Workers join by starting with --router HOST:CONTROL_PORT; the router needs no list of them.
"""
import argparse
import json
import logging
import os

from common.env_flags import apply_environment


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m router", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder, .gguf file or the default model's name (tokenizer "
                                                   "and chat template come from it)")
    ap.add_argument("--served-model-name", default=None, help="the name clients use (default: from --model)")
    ap.add_argument("--host", default="127.0.0.1", help="HTTP address")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port")
    ap.add_argument("--control-host", default=None, help="address of the workers' control endpoint (default "
                                                         "--host; 0.0.0.0 to accept workers from other hosts)")
    ap.add_argument("--control-port", type=int, default=None, help="control port (default: HTTP port + 100)")
    ap.add_argument("--heartbeat-timeout", type=float, default=2.0,
                    help="seconds without a heartbeat before a worker is declared dead")
    ap.add_argument("--migrate-wait", type=float, default=10.0,
                    help="seconds a request waits for a live worker (its own died, or the cluster is still "
                         "starting) before it fails; longer, up to --request-timeout, while a worker announces that "
                         "it is loading")
    ap.add_argument("--request-timeout", type=float, default=600.0,
                    help="seconds a request may go without any token before it fails")
    ap.add_argument("--max-queued-requests", type=int, default=1024,
                    help="requests without a first token yet (queued at workers, in prefill, or waiting for room) "
                         "the router holds; a new request beyond them gets a 429 with Retry-After at once")
    ap.add_argument("--admit-timeout", type=float, default=60.0,
                    help="seconds a request refused by every full decode worker keeps asking before it gets a 429")
    ap.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1 routes (or $NANO_PD_API_KEY, as every flag)")
    ap.add_argument("--max-request-bytes", type=int, default=4 * 2**20, help="largest request body accepted")
    ap.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds a client has to send a request's head, from connecting or from its previous "
                         "response (then 408 and the connection is closed)")
    ap.add_argument("--body-timeout", type=float, default=30.0,
                    help="seconds a client has to send the rest of a request body after its head (then 408)")
    ap.add_argument("--keep-alive-timeout", type=float, default=5.0,
                    help="seconds an idle connection stays open between requests")
    ap.add_argument("--max-connections", type=int, default=1000,
                    help="HTTP connections open at once; a request on one more gets a 503")
    ap.add_argument("--drain-timeout", type=float, default=120.0,
                    help="on SIGTERM the router answers new requests 503 and /ready 503, and exits once its open "
                         "requests are done or after this many seconds (a second SIGTERM or Ctrl-C: at once)")
    ap.add_argument("--reasoning-parser", default=None, choices=["deepseek_r1", "qwen3"],
                    help="split <think>...</think> into reasoning_content (default: no split)")
    ap.add_argument("--tool-call-parser", default="hermes", choices=["hermes"],
                    help="the tool-call format the model writes")
    ap.add_argument("--log-level", default="info")
    return ap


def main(argv=None):
    args = apply_environment(parser(), os.environ).parse_args(argv)  # NANO_PD_* variables as flags (containers)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s router %(levelname)s %(message)s")

    from transformers import AutoTokenizer

    from common.names import resolve_model, served_model_name
    from router.cluster import Cluster
    from router.metrics import RouterMetrics
    from router.server import HTTPLimits, create_app, serve

    folder = args.model
    if folder is None or not os.path.isdir(folder):
        folder = resolve_model(args.model)  # converts a GGUF once (cached): needs torch, only here
    name = args.served_model_name or served_model_name(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    metrics = RouterMetrics(name)
    cluster = Cluster(name, args.control_host or args.host, args.control_port or args.port + 100,
                      heartbeat_timeout_s=args.heartbeat_timeout, migrate_wait_s=args.migrate_wait,
                      request_timeout_s=args.request_timeout, admit_timeout_s=args.admit_timeout,
                      max_queued_requests=args.max_queued_requests, metrics=metrics)
    with open(os.path.join(folder, "config.json")) as f:
        vocab_size = json.load(f).get("vocab_size")  # the model's, which may exceed the tokenizer's
    app = create_app(cluster, tokenizer, name, metrics, request_timeout_s=args.request_timeout,
                     api_key=args.api_key, max_request_bytes=args.max_request_bytes, vocab_size=vocab_size,
                     reasoning_parser=args.reasoning_parser, tool_parser=args.tool_call_parser)
    serve(app, args.host, args.port, HTTPLimits(args.header_timeout, args.body_timeout, args.keep_alive_timeout,
                                                 args.max_connections), drain_timeout_s=args.drain_timeout)


if __name__ == "__main__":
    main()
