"""Stage 1, pretraining with random routing (paper section 3.1), and the one training loop routers use too:
``loop`` (the loop, metrics, ``pretrain``), ``evaluate`` (per-token losses under a routing: validation and
every later stage), ``fsdp`` (FSDP2 per block), ``memory`` (the memory plan of ``duollm info --memory``),
``tracking`` (TensorBoard and W&B: one W&B run per folder, the study's results)."""
