"""The report's charts, drawn with matplotlib (the ``plots`` extra); without it there are none."""

from pathlib import Path
from typing import Dict, List, Optional, Sequence

OFF_COLOR, ON_COLOR = "#969696", "#285ac8"
LINE_COLORS = ["#285ac8", "#dc5a28", "#28a050", "#963caa", "#c8a000"]
PLOTS_HINT = "no plots: matplotlib is not installed (pip install 'mlx-safesig[plots]')."


def plots_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, title: str, labels: List[str], series: Dict[str, List[Optional[float]]]):
    """Grouped bars (rates 0..1, None = no bar), one group per label, saved as PNG at ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(labels) + 2), 4.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + i * width for j, v in enumerate(values) if v is not None]
        ax.bar(xs, [100 * v for v in values if v is not None], width, label=name,
               color=(OFF_COLOR, ON_COLOR)[i % 2])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=45,
                  ha="right", fontsize=8)
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def line_chart(path: Path, title: str, lines: Dict[str, List[Sequence[float]]], threshold: float):
    """Lines of ``[x, p]`` points (p in 0..1) and a dashed threshold, saved as PNG at ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, pts) in enumerate(lines.items()):
        ax.plot([x for x, _ in pts], [p for _, p in pts], marker=".", label=label,
                color=LINE_COLORS[i % len(LINE_COLORS)])
    ax.axhline(threshold, linestyle="--", color="gray", label="threshold")
    ax.set_xlabel("response token index (prefill included; -1 = the query verdict)")
    ax.set_ylabel("p(malicious)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
