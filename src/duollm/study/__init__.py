"""The study end to end (``duollm run``): its settings (``settings``), the stages and their resume
(``run``), the cost model behind the ETA (``eta``), the sub-run folders it trains (``folders``) and the
paper's Stage-1 comparison with FLOP-matched dense models (``stage1``)."""
