"""Other tools' formats: Hugging Face transformers (``hf``: the model, export, conversion) and the
lm-evaluation-harness (``lm_eval``: the ``duollm`` model and the offline tasks)."""
