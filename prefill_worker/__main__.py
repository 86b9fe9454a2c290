"""python -m prefill_worker --router HOST:PORT [--model M] ...: start a prefill worker that joins the cluster."""
import argparse

from common.cluster.flags import worker_parser


def main(argv=None):
    ap = worker_parser("prefill", argparse.ArgumentParser(prog="python -m prefill_worker", description=__doc__))
    args = ap.parse_args(argv)
    from prefill_worker.worker import PrefillWorker

    PrefillWorker(args).run()


if __name__ == "__main__":
    main()
