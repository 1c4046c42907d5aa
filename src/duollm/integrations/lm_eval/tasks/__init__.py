"""Offline lm-evaluation-harness tasks shipped with duollm.

``TASKS_DIR`` is the folder to pass as ``--include_path``: ``python -m duollm.integrations.lm_eval.tasks``
prints it, and ``python -m duollm.integrations.lm_eval.model`` adds it by itself. Tasks:

    duollm_ppl    perplexity (per token, word and byte; bits per byte) of local text, scored with
                  ``loglikelihood_rolling``; the text is ``duollm_ppl/duollm_ppl.txt`` unless
                  ``--metadata '{"data_file": "PATH"}'`` names a file, a folder or a glob
                  (one document per file).
    duollm_mc     a 4-way multiple choice built from local text (the same text and ``data_file``;
                  ``window_words``, default 48): the true continuation of a window of words against
                  the continuations of three others, ``acc`` and ``acc_norm`` by log-likelihood: the
                  offline stand-in for ARC-Easy / HellaSwag that the Stage-1 study (``study/stage1.py``)
                  also computes on tokens.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
DEFAULT_TEXT = TASKS_DIR / "duollm_ppl" / "duollm_ppl.txt"
