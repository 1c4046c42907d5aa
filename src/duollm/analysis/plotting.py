"""What every figure shares: the fixed style, the colours, a Figure without pyplot, deterministic PNG
bytes, position binning and the layer x position heatmap (``figures.py`` draws the figures).

Array name legend: L layers, T positions, X rows.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .rundata import RunData

# fixed style, independent of the user's matplotlibrc, so output depends on the run folder only
STYLE = {
    "font.size": 8.5, "axes.titlesize": 9, "axes.labelsize": 8.5, "legend.fontsize": 7.5,
    "axes.grid": False, "figure.dpi": 100, "savefig.dpi": 110, "svg.hashsalt": "duollm",
    "image.cmap": "viridis", "axes.spines.top": False, "axes.spines.right": False,
}
COLORS = {"oracle": "#1b9e77", "fixed": "#d95f02", "best_of_100": "#7570b3", "random": "#e7298a",
          "all_small": "#666666", "all_big": "#000000", "budget": "#e6ab02", "imitation": "#a6761d",
          "straight-through": "#1f78b4", "value": "#66a61e", "expected-cost": "#e31a1c"}
MAX_POSITION_BINS = 32  # heatmap columns: positions are averaged in contiguous groups beyond this


def as_rundata(run) -> RunData:
    return run if isinstance(run, RunData) else RunData(Path(run))


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(fig: Figure) -> bytes:
    """PNG of a figure, deterministic: no Software tag, fixed style and dpi."""
    buf = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def bin_positions(a_XT: np.ndarray, max_bins: int = MAX_POSITION_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Average contiguous positions into at most ``max_bins`` columns; returns (binned, bin edges).

    Every position holds the same number of tokens (whole sequences), so a plain mean is the
    token-weighted share."""
    T = a_XT.shape[-1]
    n = min(T, max_bins)
    edges = np.linspace(0, T, n + 1).round().astype(int)
    out = np.stack([a_XT[..., a:b].mean(-1) for a, b in zip(edges[:-1], edges[1:])], axis=-1)
    return out, edges


def heatmap(ax, share_LT: np.ndarray, title: str, vmax: float = 1.0):
    """Layers bottom (first) to top (last), positions left to right (binned)."""
    binned_LB, edges = bin_positions(np.asarray(share_LT, dtype=np.float64))
    L = binned_LB.shape[0]
    im = ax.imshow(binned_LB, aspect="auto", origin="lower", vmin=0.0, vmax=vmax, interpolation="nearest",
                   extent=(0, edges[-1], 0.5, L + 0.5), cmap="viridis")
    ax.set_title(title)
    ax.set_yticks(range(1, L + 1, max(1, L // 6)))
    ax.set_xlabel("position")
    return im


def styled(fn):
    """Build the figure under the fixed style (fonts, sizes) so rendering never depends on rc files."""
    def wrapped(run, *args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return fn(as_rundata(run), *args, **kwargs)
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def visible(text: str) -> str:
    """A token's text made visible in a label: spaces, newlines and tabs get symbols."""
    return text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"
