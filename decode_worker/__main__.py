"""python -m decode_worker --router HOST:PORT [--model M] ...: start a decode worker that joins the cluster."""
import argparse

from common.cluster.flags import add_worker_args


def main(argv=None):
    ap = add_worker_args(argparse.ArgumentParser(prog="python -m decode_worker", description=__doc__))
    ap.add_argument("--kv-lease", type=float, default=60.0,
                    help="seconds reserved blocks wait for their KV before they are freed and the request retried")
    ap.add_argument("--max-pending", type=int, default=None,
                    help="admissions queued for blocks before new ones are refused (default 4 x max-num-seqs)")
    args = ap.parse_args(argv)
    from decode_worker.worker import DecodeWorker

    DecodeWorker(args).run()


if __name__ == "__main__":
    main()
