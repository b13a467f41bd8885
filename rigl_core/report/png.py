"""Draw a run's normalised report (report_data.py) as one PNG of six panels, for papers and CI.

The figure is built on matplotlib's Agg canvas directly rather than through pyplot, so rendering never
needs a display, never touches the process-wide backend (a notebook that imports this keeps its own)
and keeps no global figure state between calls.

Panels: (a) training and validation loss, (b) validation accuracy, (c) target vs achieved density per
masked layer, (d) drop fraction and mask churn per update, (e) exploration (share of the masked weights
ever active), (f) training and inference FLOPs as a fraction of dense. A panel without data says so
instead of failing: a dense or static run has no mask updates, a queued job has no curves yet.
"""

from __future__ import annotations

from pathlib import Path

from rigl_core.optional import require

require("matplotlib", "report", "drawing a report PNG")  # one line naming the extra, not a traceback

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

TARGET_COLOR = "#9ecae1"  # density bars; tests look for these exact colours in the image
ACHIEVED_COLOR = "#08519c"
TRAIN_COLOR, VAL_COLOR = "#31a354", "#de2d26"
ACCURACY_COLOR = "#756bb1"
DROP_COLOR, CHURN_COLOR = "#fd8d3c", "#8c510a"
EXPLORATION_COLOR = "#1b9e77"
FLOPS_COLORS = ("#fc9272", "#fdd0a2")  # training, inference
MAX_LAYERS = 32  # beyond this the bars are unreadable: show the largest layers, say so in the panel title
NAME_CHARS = 18


def _values(rows: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777777", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def _line(ax, xs, ys, color, label) -> None:
    ax.plot(xs, ys, color=color, label=label, linewidth=1.6, marker="o" if len(xs) <= 30 else None,
            markersize=3.5)


def _lines(ax, series: list[tuple], empty: str) -> bool:
    """Draw each (steps, values, colour, label) that has points, or say `empty` when none has."""
    drawn = [line for line in series if line[1]]
    if not drawn:
        _no_data(ax, empty)
        return False
    for steps, values, color, label in drawn:
        _line(ax, steps, values, color, label)
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return True


def _loss(ax, data: dict) -> None:
    ax.set_title("(a) loss", loc="left")
    steps, loss = _values(data["train"], "loss")
    label = "training loss"
    if not loss:  # the service may log few training steps; the per-epoch mean is in every evaluation
        steps, loss = _values(data["eval"], "train_loss")
        label = "training loss (epoch mean)"
    val_steps, val_loss = _values(data["eval"], "val_loss")
    _lines(ax, [(steps, loss, TRAIN_COLOR, label), (val_steps, val_loss, VAL_COLOR, "validation loss")],
           "no loss logged yet")


def _accuracy(ax, data: dict) -> None:
    ax.set_title("(b) validation accuracy", loc="left")
    steps, accuracy = _values(data["eval"], "val_accuracy")
    if not accuracy:
        _no_data(ax, "no evaluation yet")
        return
    _line(ax, steps, accuracy, ACCURACY_COLOR, "validation accuracy")
    ax.annotate(f"{accuracy[-1]:.4f}", (steps[-1], accuracy[-1]), textcoords="offset points", xytext=(-4, -14),
                ha="right", fontsize=9, color=ACCURACY_COLOR)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else "…" + name[-(NAME_CHARS - 1):]


def _densities(ax, data: dict) -> None:
    masked = [r for r in data["layers"] if r["masked"] and r["target_density"] is not None]
    title = "(c) density per masked layer"
    if not masked:
        ax.set_title(title, loc="left")
        _no_data(ax, "no masked layers (dense method)" if data["method"] == "dense" else "no per-layer data")
        return
    if len(masked) > MAX_LAYERS:
        largest = {id(r) for r in sorted(masked, key=lambda r: -r["params"])[:MAX_LAYERS]}
        title += f" ({MAX_LAYERS} largest of {len(masked)})"
        masked = [r for r in masked if id(r) in largest]  # keep network order
    n = len(masked)
    measured = data["final"] and all(r["density"] is not None for r in masked)
    ax.set_title(title, loc="left")
    width = 0.4 if measured else 0.6
    xs = list(range(n))
    ax.bar([x - width / 2 if measured else x for x in xs], [r["target_density"] for r in masked], width,
           color=TARGET_COLOR, label="target" if measured else "target (plan: job not finished)")
    if measured:
        ax.bar([x + width / 2 for x in xs], [r["density"] for r in masked], width, color=ACHIEVED_COLOR,
               label="achieved")
    top = max(max(r["target_density"] for r in masked), max((r["density"] or 0) for r in masked))
    ax.set_ylim(0, top * 1.25 + 0.01)  # headroom for the legend above the tallest bar
    ax.set_yticks([t for t in ax.get_yticks() if t <= 1.0 + 1e-9])  # no density ticks past 1
    ax.set_ylabel("density")
    ax.set_xticks(xs)
    ax.set_xticklabels([_short(r["name"]) for r in masked], rotation=0 if n <= 5 else 90,
                       fontsize=max(6, min(9, int(240 / n))))
    ax.set_xlim(-0.6, n - 0.4)
    ax.legend(fontsize=8, loc="upper left", ncols=2)


def _no_updates(data: dict) -> str:
    if data["method"] in ("dense", "static"):
        return f"no mask updates ({data['method']} method)"
    return "no mask updates yet"


def _single_update_bars(ax, data: dict, series: list[tuple]) -> None:
    """One mask update: a lone dot on a step axis reads as nothing, so draw each (step, value, colour,
    label) as a labelled bar at its step, a few percent of the run wide."""
    step = series[0][0]
    width = max(1.0, 0.04 * (data.get("total_steps") or 2 * step or 25))
    center = max(step, width * len(series) / 2)  # an update at step 0 stays inside the step axis
    for i, (_, value, color, label) in enumerate(series):
        x = center + (i - (len(series) - 1) / 2) * width
        ax.bar(x, value, width, color=color, label=label)
        ax.text(x, value, f"{value:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_xlabel(f"step (one mask update, at step {step})")


def _updates(ax, data: dict) -> None:
    ax.set_title("(d) drop fraction and mask churn per update", loc="left")
    steps, drop = _values(data["mask_updates"], "drop_fraction")
    churn_steps, churn = _values(data["mask_updates"], "churn")
    series = [(steps, drop, DROP_COLOR, "drop fraction"),
              (churn_steps, churn, CHURN_COLOR, "churn (new weights / active)")]
    if len(data["mask_updates"]) == 1 and (drop or churn):
        _single_update_bars(ax, data, [(xs[0], ys[0], c, label) for xs, ys, c, label in series if ys])
        top = max(ys[0] for _, ys, _, _ in series if ys)
        ax.set_ylim(0, top * 1.3 + 0.01)  # room for the value labels and the legend
        ax.legend(fontsize=8)
        return
    if _lines(ax, series, _no_updates(data)):
        ax.set_ylim(bottom=0)


def _exploration(ax, data: dict) -> None:
    ax.set_title("(e) exploration: share of weights ever active", loc="left")
    steps, explored = _values(data["mask_updates"], "exploration")
    if not explored:
        _no_data(ax, _no_updates(data))
        return
    if len(explored) == 1:
        _single_update_bars(ax, data, [(steps[0], explored[0], EXPLORATION_COLOR, "ever active")])
    else:
        _line(ax, steps, explored, EXPLORATION_COLOR, "ever active")
        ax.set_xlabel("step")
    sparsity = data["totals"].get("sparsity")
    if sparsity is not None:  # the floor: a method that never moves the mask explores only its density
        ax.axhline(1 - sparsity, color="#999999", linestyle="--", linewidth=1, label=f"density {1 - sparsity:.3f}")
    ax.set_ylim(0, min(1.02, max(explored) * 1.25))
    ax.legend(fontsize=8, loc="lower right")


def _flops(ax, data: dict) -> None:
    ax.set_title("(f) FLOPs as a fraction of dense", loc="left")
    totals = data["totals"]
    bars = [(label, totals.get(key), color) for label, key, color in
            (("training", "training_flops_ratio", FLOPS_COLORS[0]),
             ("inference", "inference_flops_ratio", FLOPS_COLORS[1]))
            if totals.get(key) is not None]
    if not bars:
        _no_data(ax, "no FLOPs data")
        return
    xs = range(len(bars))
    ax.bar(xs, [b[1] for b in bars], 0.55, color=[b[2] for b in bars], edgecolor="#555555")
    for x, (_, value, _) in zip(xs, bars):
        ax.text(x, value + 0.02, f"{value:.3f}×", ha="center", va="bottom", fontsize=10)
    ax.axhline(1.0, color="#555555", linestyle="--", linewidth=1)
    ax.text(len(bars) - 0.5, 1.0, "dense", ha="right", va="bottom", fontsize=8, color="#555555")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([b[0] for b in bars])
    ax.set_ylim(0, max(1.15, max(b[1] for b in bars) * 1.15))
    ax.set_xlim(-0.6, len(bars) - 0.4)


PANELS = (_loss, _accuracy, _densities, _updates, _exploration, _flops)
BAR_PANELS = (_densities, _flops)
STEP_PANELS = (0, 1, 3, 4)  # share one step axis, the whole run, so the curves line up by eye


def render(data: dict, path: str | Path, dpi: int = 150) -> Path:
    """Write the six-panel figure to `path` as PNG (whatever its suffix) and return the path."""
    figure = Figure(figsize=(16, 9), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    for panel, ax in zip(PANELS, axes.flat):
        panel(ax, data)
        if ax.has_data():
            ax.grid(alpha=0.25, axis="y" if panel in BAR_PANELS else "both")
    if data.get("total_steps"):
        for i in STEP_PANELS:
            if axes.flat[i].has_data():
                axes.flat[i].set_xlim(0, data["total_steps"] * 1.02)
    figure.suptitle(data["title"], fontsize=13)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi, facecolor="white")
    return path


# ---------------------------------------------------------------------------------------------- sweeps
FRONTIER_COLOR = "#e6550d"
METHOD_COLORS = ("#3182bd", "#31a354", "#756bb1", "#636363", "#e6550d", "#de2d26", "#8c510a")


def _sweep_panel(ax, groups: list[dict], cost: str, frontier_keys: list[str], xlabel: str) -> None:
    """Each group's mean val_accuracy (± sd over seeds) against one cost, by method; the frontier as a step line."""
    points = [g for g in groups if g["val_accuracy"]["mean"] is not None and g.get(cost) is not None]
    if not points:
        _no_data(ax, "no finished children yet")
        return
    methods = sorted({g["method"] for g in points})
    for i, method in enumerate(methods):
        mine = [g for g in points if g["method"] == method]
        ax.errorbar([g[cost] for g in mine], [g["val_accuracy"]["mean"] for g in mine],
                    yerr=[g["val_accuracy"]["sd"] or 0.0 for g in mine], fmt="o", capsize=3, markersize=5,
                    color=METHOD_COLORS[i % len(METHOD_COLORS)], label=method)
        for g in mine:
            ax.annotate(f"{g['distribution']} {g['sparsity']}", (g[cost], g["val_accuracy"]["mean"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points", color="#555555")
    by_key = {g["key"]: g for g in points}
    front = [by_key[k] for k in frontier_keys if k in by_key]
    if front:
        ax.step([g[cost] for g in front], [g["val_accuracy"]["mean"] for g in front], where="post",
                color=FRONTIER_COLOR, linewidth=1.6, label="Pareto frontier")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val accuracy (mean ± sd over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.25)


def render_sweep(sweep: dict, path: str | Path, dpi: int = 150) -> Path:
    """A sweep (GET /v1/sweeps/{id}) as one PNG: accuracy against inference FLOPs and against the packed
    export's size, with each Pareto frontier."""
    figure = Figure(figsize=(14, 6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    groups = sweep.get("aggregate") or []
    frontier = sweep.get("frontier") or {}
    _sweep_panel(left, groups, "inference_flops_ratio", frontier.get("flops", []),
                 "inference FLOPs (fraction of dense)")
    _sweep_panel(right, groups, "packed_bytes", frontier.get("size", []), "packed export (bytes)")
    progress = sweep.get("progress") or {}
    figure.suptitle(f"sweep {sweep.get('name') or sweep.get('id')}: {progress.get('finished', 0)}/"
                    f"{progress.get('total', 0)} children finished", fontsize=13)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi, facecolor="white")
    return path
