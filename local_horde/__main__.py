"""Run a local horde by hand: `python -m local_horde --models tiny-sd1 --port 7001`.

Useful to point a worker (or curl) at it; queue work with the requester endpoints or `--requests N`.
"""

from __future__ import annotations

import argparse
import logging
import threading

from local_horde import LocalHorde

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m local_horde")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--models", nargs="+", default=["stable_diffusion"])
    parser.add_argument("--latency", type=float, default=0.0, help="extra seconds on every API call")
    parser.add_argument("--job-ttl", type=float, default=None)
    parser.add_argument("--requests", type=int, default=0, help="queue this many small txt2img requests")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with LocalHorde(
        known_models=args.models, port=args.port, extra_latency_s=args.latency, job_ttl=args.job_ttl
    ) as horde:
        for _ in range(args.requests):
            horde.request_generation({"steps": 4, "width": 64, "height": 64}, models=args.models[:1])
        logger.info("local horde at %s (api %s), api key %s", horde.base_url, horde.api_url, horde.api_key)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            logger.info("stopping")


if __name__ == "__main__":
    main()
