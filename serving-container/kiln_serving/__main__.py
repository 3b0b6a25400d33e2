"""``python -m kiln_serving [serve]``: the serving images' entrypoint (SageMaker starts it as ``serve``)."""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

from kiln_serving.config import ServingSettings
from kiln_serving.server import serve


def main(argv: list[str]) -> int:
    if argv not in ([], ["serve"]):
        print(f"usage: python -m kiln_serving [serve]  (got {' '.join(argv)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServingSettings()
    except ValidationError as exc:
        print(f"invalid KILN_SERVING_* setting: {exc}", file=sys.stderr)
        return 2
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
