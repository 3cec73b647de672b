"""Figures, always saved as PNG files of a fixed pixel size (matplotlib's Agg backend, never shown).

Each function builds one figure with ``matplotlib.figure.Figure`` (no pyplot state), saves it atomically through
:mod:`image_similarity.fileio` and returns the path.
"""
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..data.fileio import atomic_path
from ..data.images import load_image

__all__ = ["DPI", "plot_top_n_curves", "plot_rank_histogram", "format_distance", "plot_query_result",
           "plot_retrieval_grid", "plot_score_vs_probability", "plot_refine_curves", "plot_table",
           "plot_contact_sheet", "plot_duplicate_groups", "plot_embedding_map"]

DPI = 100  # figure inches * DPI = PNG pixels (no tight bounding box, so sizes are exact)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">")
LINE_STYLES = ("-", "--", "-.", ":")


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor=fig.get_facecolor())
    return path


def plot_top_n_curves(results, top_ns, path, title="Top-N accuracy"):
    """One line per ranker: the fraction of queries whose positive is within the top N, against N.

    Parameters
    ----------
    results : dict of str to dict
        ``{ranker: {'top1': fraction, ...}}`` as written to evaluation.json.
    top_ns : list of int
    path : str or Path
        PNG written, 900 x 600 pixels.
    """
    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    # Rankers often tie (L2 and cosine rank normalised embeddings alike): each curve gets its own marker and dash, and
    # markers shrink as curves are drawn over earlier ones, so a curve hidden under another still shows round it.
    for i, (name, metrics) in enumerate(results.items()):
        ax.plot(top_ns, [100.0 * metrics[f"top{n}"] for n in top_ns], label=name, marker=MARKERS[i % len(MARKERS)],
                markersize=max(3.0, 13.0 - 1.5 * i), linestyle=LINE_STYLES[i % len(LINE_STYLES)], linewidth=1.5)
    ax.set(xlabel="N", ylabel="queries with the positive in the top N (%)", title=title, ylim=(0, 102))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_rank_histogram(ranks, path, title="Rank of the positive"):
    """How many queries put the positive at rank 1, 2, 3-4, 5-8, ... (doubling buckets), bars grouped by ranker.

    Parameters
    ----------
    ranks : dict of str to ndarray of int
        ``{ranker: 1-based ranks (n_queries,)}``.
    path : str or Path
        PNG written, 900 x 600 pixels.
    """
    highest = max(int(np.max(r)) for r in ranks.values())
    edges = [1, 2]
    while edges[-1] <= highest:
        edges.append(2 * edges[-1] - 1)  # 1, 2, 3, 5, 9, 17, ...: buckets [1], [2], [3, 4], [5, 8], ...
    names = [str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in zip(edges[:-1], edges[1:])]
    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    width = 0.8 / len(ranks)
    for n, (name, r) in enumerate(ranks.items()):
        counts, _ = np.histogram(r, bins=edges)
        ax.bar(np.arange(len(names)) + (n - (len(ranks) - 1) / 2) * width, counts, width, label=name)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set(xlabel="rank of the positive (1 = first)", ylabel="queries", title=title)
    ax.legend(loc="upper right")
    return _save(fig, path)


def format_distance(distance):
    """Three significant digits: class-probability distances are often below 0.001 and would all print as 0.000."""
    return f"{distance:.3g}"


def plot_query_result(query, best, positive, best_distance, positive_distance, correct, path, title=""):
    """The tutorial's per-query figure: query, closest reference, true positive; green frame when they agree.

    Parameters
    ----------
    query, best, positive : PIL.Image.Image or None
        None draws an empty panel (an unreadable file).
    best_distance, positive_distance : float
    correct : bool
        Whether the closest reference is the positive; the figure background is green if so, red otherwise.
    path : str or Path
        PNG written, 900 x 360 pixels.
    title : str
        Shown under "query" (the query's key).
    """
    fig = Figure(figsize=(9, 3.6), facecolor="green" if correct else "red")
    titles = (f"query\n{title}" if title else "query", f"closest match\n(dist={format_distance(best_distance)})",
              f"correct match\n(dist={format_distance(positive_distance)})")
    for ax, img, text in zip(fig.subplots(1, 3), (query, best, positive), titles):
        if img is not None:
            ax.imshow(img)
        ax.set_title(text, color="white")
        ax.axis("off")
    return _save(fig, path)


def plot_retrieval_grid(query, matches, path, columns=5, title="query"):
    """The query and its closest references in a grid, each captioned with its label and distance.

    Parameters
    ----------
    query : PIL.Image.Image
    matches : list of (PIL.Image.Image or None, str, float)
        ``(image, label, distance)`` in rank order.
    path : str or Path
        PNG written, ``columns * 2`` inches wide (200 px per column), 2.2 inches (220 px) per row.
    """
    n_rows = 1 + int(np.ceil(len(matches) / columns))
    fig = Figure(figsize=(2 * columns, 2.2 * n_rows))
    axes = np.asarray(fig.subplots(n_rows, columns)).reshape(n_rows, columns)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].imshow(query)
    axes[0, 0].set_title(title, fontsize=9)
    for n, (img, label, distance) in enumerate(matches):
        ax = axes[1 + n // columns, n % columns]
        if img is not None:
            ax.imshow(img)
        ax.set_title(f"{n + 1}. {label}\n{format_distance(distance)}", fontsize=8)
    return _save(fig, path)


def plot_score_vs_probability(calibrated, scores, same_label, path):
    """The Platt sigmoid (SVM score -> calibrated probability) with the validation pairs as points.

    Parameters
    ----------
    calibrated : rankers.CalibratedRanker
        Fitted; provides ``score_to_probability``.
    scores : ndarray of shape (n_pairs,), float
        SVM scores of the validation pairs.
    same_label : ndarray of shape (n_pairs,), bool
    path : str or Path
        PNG written, 900 x 600 pixels.
    """
    scores, same_label = np.asarray(scores, np.float64), np.asarray(same_label, bool)
    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    low, high = float(scores.min()) - 0.5, float(scores.max()) + 0.5
    grid = np.linspace(low, high, 200)
    ax.plot(grid, calibrated.score_to_probability(grid), color="black", label="calibrated probability")
    jitter = np.random.default_rng(0).uniform(-0.02, 0.02, scores.size)
    for mask, color, name in ((~same_label, "tab:red", "different label"), (same_label, "tab:green", "same label")):
        ax.scatter(scores[mask], same_label[mask] + jitter[mask], s=8, alpha=0.4, color=color,
                   label=f"validation pairs: {name} ({int(mask.sum())})")
    ax.set(xlabel="SVM score (higher = more similar)", ylabel="P(same label)", ylim=(-0.06, 1.06),
           title="Weighted L2 SVM: score vs calibrated probability")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    return _save(fig, path)


def plot_refine_curves(log_rows, path):
    """Training and validation loss (left) and error (right) per epoch, saved as a 1000 x 400 pixel PNG.

    Parameters
    ----------
    log_rows : list of dict
        ``refine.RefineResult.log_rows``: one dict per epoch with train/val loss and err.
    path : str or Path
        PNG written atomically (Agg, never shown).
    """
    epochs = [row["epoch"] for row in log_rows]
    fig = Figure(figsize=(10, 4))
    for ax, metric, label in zip(fig.subplots(1, 2), ("loss", "err"), ("cross-entropy loss", "error rate")):
        for split, style in (("train", "o-"), ("val", "s--")):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in log_rows], style, label=split)
        ax.set(xlabel="epoch", ylabel=label, title=f"{label} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def plot_table(header, rows, path, title="", bold_last_row=False):
    """A small table of text as a PNG: a bold header, one row per item, 1.6 inches (160 px) per column.

    Parameters
    ----------
    header : list of str
        Column names; the first column is left-aligned (row names), the others right-aligned (numbers).
    rows : list of list
        Cells, each shown with ``str``; every row as long as ``header``.
    path : str or Path
        PNG written, ``1.6 * len(header)`` inches wide and ``0.35 * (len(rows) + 1) + 0.5`` inches high (with a
        title; 0.2 inches less without).
    title : str
        Drawn above the table; '' = none.
    bold_last_row : bool
        Set the last row in bold, e.g. a row of totals.
    """
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"every row needs {len(header)} cells like the header {header}, got "
                         f"{sorted({len(row) for row in rows})}")
    height = 0.35 * (len(rows) + 1) + (0.5 if title else 0.3)
    fig = Figure(figsize=(1.6 * len(header), height), facecolor="white")
    ax = fig.add_axes((0.02, 0.1 / height, 0.96, 1 - (0.45 if title else 0.2) / height))
    ax.axis("off")
    table = ax.table(cellText=[[str(cell) for cell in row] for row in rows], colLabels=list(header),
                     cellLoc="right", loc="upper center", bbox=(0, 0, 1, 1))
    table.auto_set_font_size(False)
    for (row, col), cell in table.get_celld().items():
        cell.set_fontsize(11)
        cell.set_text_props(ha="left" if col == 0 else "right",
                            weight="bold" if row == 0 or (bold_last_row and row == len(rows)) else "normal")
        cell.set_facecolor("#e8e8e8" if row == 0 else "white")
        cell.PAD = 0.05
    if title:
        fig.suptitle(title, fontsize=12, y=1 - 0.12 / height)
    return _save(fig, path)


def plot_contact_sheet(tiles, path, columns=6, title=""):
    """A grid of thumbnails, each with a caption of a few short lines (the label-issue suspects).

    Parameters
    ----------
    tiles : list of (PIL.Image.Image or None, str)
        ``(image, caption)`` in reading order; None leaves the tile blank (an unreadable image).
    path : str or Path
        PNG written, ``columns * 2`` inches wide (200 px per column), 2.6 inches (260 px) per row.
    """
    n_rows = max(1, int(np.ceil(len(tiles) / columns)))
    fig = Figure(figsize=(2 * columns, 2.6 * n_rows + (0.4 if title else 0)))
    axes = fig.subplots(n_rows, columns, squeeze=False, gridspec_kw={"hspace": 0.45, "left": 0.02, "right": 0.98,
                                                                    "bottom": 0.02})
    for ax in axes.ravel():
        ax.axis("off")
    for n, (img, caption) in enumerate(tiles):
        ax = axes[n // columns, n % columns]
        if img is not None:
            ax.imshow(img)
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_duplicate_groups(groups, root, path, max_groups=8, max_per_group=6):
    """A contact sheet of the largest groups of near-duplicates: one row per group, the kept image first.

    Parameters
    ----------
    groups : list of list of (str, float)
        From ``dedup.find_duplicates``: ``(key, distance to the kept image)``, kept first.
    root : str or Path
        Keys are read relative to it (absolute keys as they are).
    path : str or Path
        The PNG written.
    max_groups, max_per_group : int
        Rows shown (largest groups first) and images per row.
    """
    tiles = []
    for group in sorted(groups, key=len, reverse=True)[:max_groups]:
        shown = group[:max_per_group]
        for column, (key, distance) in enumerate(shown):
            caption = "kept" if column == 0 else f"d = {format_distance(distance)}"
            tiles.append((load_image(Path(root) / key), f"{caption}\n{Path(key).name[:24]}"))
        tiles += [(None, "")] * (max_per_group - len(shown))
    return plot_contact_sheet(tiles, path, columns=max_per_group,
                              title="near-duplicate groups" if tiles else "no near-duplicates")


def plot_embedding_map(emap, path, image_root=None, max_thumbnails=300, thumb_px=28, title="embedding map"):
    """The collection in the plane: a dot (or a thumbnail) per image coloured by label, a red ring round each
    label-issue suspect, a grey line between near-duplicates.

    Parameters
    ----------
    emap : embedding_map.EmbeddingMap
    path : str or Path
        PNG written, 1200 x 1000 pixels.
    image_root : str or Path, optional
        The folder the keys are relative to: thumbnails are drawn when given and there are at most
        ``max_thumbnails`` images (unreadable ones stay dots).
    max_thumbnails, thumb_px : int
    title : str
    """
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig = Figure(figsize=(12, 10))
    ax = fig.subplots()
    xy = np.asarray(emap.coords, dtype=float)
    for a, b in emap.duplicate_pairs:
        ax.plot(xy[[a, b], 0], xy[[a, b], 1], color="0.4", lw=1.2, zorder=1)
    names = sorted(set(emap.labels))
    palette = colormaps["tab10" if len(names) <= 10 else "tab20"]
    colours = {name: palette(i % palette.N) for i, name in enumerate(names)}
    for name in names:
        rows = [i for i, label in enumerate(emap.labels) if label == name]
        ax.scatter(xy[rows, 0], xy[rows, 1], s=22, color=colours[name], label=name or "(no label)", zorder=2)
    suspects = [i for i, s in enumerate(emap.suspects) if s]
    if suspects:
        ax.scatter(xy[suspects, 0], xy[suspects, 1], s=260, facecolors="none", edgecolors="red", linewidths=2,
                   label="label issue", zorder=4)
    if emap.duplicate_pairs:
        ax.plot([], [], color="0.4", lw=1.2, label="near-duplicates")
    if image_root is not None and len(emap.keys) <= max_thumbnails:
        for (x, y), key, label in zip(xy, emap.keys, emap.labels):
            image = load_image(Path(image_root) / key)
            if image is not None:
                image.thumbnail((thumb_px, thumb_px))
                box = AnnotationBbox(OffsetImage(np.asarray(image), zoom=1.0), (x, y), frameon=True, pad=0.1,
                                     bboxprops={"edgecolor": colours[label], "linewidth": 1.5})
                box.set_zorder(3)
                ax.add_artist(box)
    ax.set(xlim=(-0.05, 1.05), ylim=(-0.05, 1.05), xticks=[], yticks=[],
           title=f"{title}: {len(emap.keys)} images, {emap.method}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.82, bottom=0.02, top=0.95)
    return _save(fig, path)
