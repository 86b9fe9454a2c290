"""python -m decode_worker --router HOST:PORT [--model M] ...: start a decode worker that joins the cluster."""
import argparse
import os

from common.cluster.flags import worker_parser
from common.cluster.runtime import announce_starting


def main(argv=None):
    ap = worker_parser("decode", argparse.ArgumentParser(prog="python -m decode_worker", description=__doc__),
                       environ=os.environ)  # NANO_PD_* variables as flags (containers)
    args = ap.parse_args(argv)
    with announce_starting(args, args.role):  # the imports and the model load take seconds
        from decode_worker.worker import DecodeWorker

        worker = DecodeWorker(args)
    worker.run()


if __name__ == "__main__":
    main()
