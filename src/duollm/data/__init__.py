"""Text to token ids: corpora, tokenizers and the deterministic split (``corpus``); a run folder's
tokenizer and token cache (``cache``)."""
