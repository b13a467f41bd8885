"""Entry point of ranks 1..N-1 of a multi-device job (started by `rigl_core.training.distributed.start`):
build the same Trainer from the spec, join rank 0's process group, resume if asked, and train."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from rigl_core.spec import JobSpec
from rigl_core.training.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    """Entry point of ranks 1..N-1 (started by `start`)."""
    parser = argparse.ArgumentParser(prog="python -m rigl_core.training.rank")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--resume")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # rank 0 decides when to stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = JobSpec.model_validate_json(Path(args.spec).read_text())
    trainer = Trainer(spec, rank=args.rank, master_port=args.port)
    if args.resume:
        trainer.load_checkpoint(args.resume)
    trainer.fit()
    return 0


if __name__ == "__main__":
    code = main()
    # Everything this rank owed rank 0 went through the collectives. Skip interpreter teardown:
    # gloo threads destroyed there can abort the process ("terminate called without an active
    # exception"), which would read as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
