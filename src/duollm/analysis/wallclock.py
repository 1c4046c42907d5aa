"""The report's "compute and wall-clock" section, from ``duollm bench``'s table (``RUN/bench/bench.json``).

Speed-ups over all-big next to the ideals the routes allow (FLOP-proportional for prefill,
weight-bytes-proportional for decode) and the share of the ideal gain realised (``duollm.inference.bench``).
"""

from __future__ import annotations

KEYS = ("policy", "batch", "prefill_tokens_per_s", "prefill_speedup", "prefill_ideal", "prefill_gain_share",
        "decode_tokens_per_s", "decode_speedup", "decode_ideal", "decode_gain_share", "decode_big")


def section(bench: dict | None) -> dict | None:
    """What results.json keeps of the benchmark: its setting and one row per policy and batch size."""
    if not bench:
        return None
    rows = [{k: (round(r[k], 4) if isinstance(r.get(k), float) else r.get(k)) for k in KEYS} for r in bench["rows"]]
    return {"machine": bench.get("machine"), "threads": bench.get("threads"), "device": bench.get("device"),
            "prompt_len": bench.get("prompt_len"), "new_tokens": bench.get("new_tokens"),
            "run_step": bench.get("run_step"), "rows": rows}


def tables(sec: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for the report, or nothing when ``duollm bench`` has not been run."""
    if not sec:
        return []

    def share(v):
        return "—" if v is None else f"{v:.0%}"

    def num(v, fmt, missing="—"):  # a time a busy machine made unmeasurable (duollm bench says so)
        return missing if v is None else format(v, fmt)

    title = (f"Compute and wall-clock (duollm bench at step {sec['run_step']}: {sec['device']}, {sec['threads']} threads, "
             f"prompts of {sec['prompt_len']} tokens, {sec['new_tokens']} decoded; speed-up over all-big, its ideal "
             f"(prefill: FLOP-proportional, decode: weight-bytes-proportional) and the share of the ideal gain)")
    header = ["policy", "batch", "prefill tok/s", "speed-up", "ideal", "gain share", "decode tok/s", "speed-up",
              "ideal", "gain share", "big share (decode)"]
    rows = [[r["policy"], str(r["batch"]), num(r["prefill_tokens_per_s"], ",.0f", "unmeasurable"),
             num(r["prefill_speedup"], ".2f"), f"{r['prefill_ideal']:.2f}", share(r["prefill_gain_share"]),
             num(r["decode_tokens_per_s"], ",.1f", "unmeasurable"), num(r["decode_speedup"], ".2f"),
             f"{r['decode_ideal']:.2f}", share(r["decode_gain_share"]), f"{r['decode_big']:.2f}"] for r in sec["rows"]]
    return [(title, header, rows)]
