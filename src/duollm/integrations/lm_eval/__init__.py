"""lm-evaluation-harness: the ``duollm`` model (``model``) and the offline tasks it is tested on (``tasks``).

``main`` is the ``duollm-lm-eval`` console script. It imports lm-eval only when called, so that without
the extra it ends in one line saying what to install (exit 1, an environment failure), not a traceback.
"""

from __future__ import annotations

import sys

MISSING = "duollm-lm-eval needs the lm-evaluation-harness: pip install 'duollm[lm-eval]'"


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with ``--model duollm`` registered and the shipped tasks included."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print(MISSING, file=sys.stderr)
        raise SystemExit(1) from None
    from .model import main as lm_eval_main

    lm_eval_main(argv)
