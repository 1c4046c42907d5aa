"""lm-evaluation-harness: the ``duollm`` model (``model``) and the offline tasks it is tested on (``tasks``)."""
