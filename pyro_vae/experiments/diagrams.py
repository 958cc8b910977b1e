"""Plate diagrams drawn with matplotlib from what Pyro reads off a program
(:func:`pyro.infer.inspect.get_model_relations`): a stand-in for ``pyro.render_model`` where the
``graphviz`` package or its ``dot`` program is missing. Notebook 1's drawing, for any number of
sites, parents and plates."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import matplotlib.pyplot as plt
from matplotlib.patches import Circle, FancyArrowPatch, Rectangle

__all__ = ["draw_plate_diagram"]

RADIUS = 0.1  # of a site's circle, in axes units


def _arrow(ax, a, b, **style) -> None:
    """From the rim of the circle at ``a`` to the rim of the one at ``b``."""
    (au, av), (bu, bv) = a, b
    length = max(1e-9, ((bu - au) ** 2 + (bv - av) ** 2) ** 0.5)
    du, dv = (bu - au) / length * RADIUS, (bv - av) / length * RADIUS
    ax.add_patch(FancyArrowPatch((au + du, av + dv), (bu - du, bv - dv), arrowstyle="-|>", mutation_scale=14, **style))


def _same_plate(relations: dict, site: str) -> List[str]:
    return [o for o in relations["observed"]
            if any(site in members and o in members for members in relations["plate_sample"].values())]


#: label side -> (offset from the node's centre in radii + 0.02, alignment)
_LABEL_PLACES = {"above": ((0, 1), dict(ha="center", va="bottom")), "left": ((-1, 0), dict(ha="right", va="center")),
                 "right": ((1, 0), dict(ha="left", va="center"))}


def _dist_label(ax, centre, text: str, side: str) -> None:
    """A site's distribution name next to its node, on ``side`` (a key of ``_LABEL_PLACES``)."""
    (du, dv), align = _LABEL_PLACES[side]
    gap = RADIUS + 0.02
    ax.text(centre[0] + du * gap, centre[1] + dv * gap, text, fontsize=8, color="0.3", **align)


def draw_plate_diagram(relations: dict, guide_relations: Optional[dict] = None,
                       pos: Optional[Dict[str, Tuple[float, float]]] = None, size=(3.5, 3.5), names=None,
                       reads: Optional[Dict[str, List[str]]] = None, edges: Tuple[Tuple[str, str], ...] = (),
                       label_side: Optional[Dict[str, str]] = None):
    """Sites as circles (observed ones shaded) with their distributions, solid arrows for the
    model's dependencies (``relations["sample_sample"]``), a box per plate; with
    ``guide_relations``, dashed blue arrows for the guide's: every latent site it samples depends
    on observed sites (an amortized guide reads the data, ``reads``) and on the guide's own parents.

    :param pos: site -> (u, v), v in [0, 1], u in [0, width / height]; default: top to bottom in
        sampling order.
    :param names: site -> label (LaTeX without the dollars); default the site's name.
    :param reads: guide site -> the observed sites its distribution reads; default: the observed
        sites in a plate with it.
    :param edges: more model arrows ``(parent, child)``: Pyro records dependencies on sampled
        values only, so an observed parent (a label given as data) needs one.
    :param label_side: site -> ``"above"`` (default), ``"left"`` or ``"right"``: where its
        distribution's name goes (beside a node that has arrows coming in from above).
    """
    sites = list(relations["sample_sample"])
    pos = pos or {site: (0.45, 0.75 - 0.45 * i) for i, site in enumerate(sites)}  # (u, v): v in [0, 1], u in [0, width/height]
    names = names or {}
    fig, ax = plt.subplots(figsize=size)
    for site in sites:
        u, v = pos[site]
        shaded = "0.8" if site in relations["observed"] else "white"
        ax.add_patch(Circle((u, v), RADIUS, facecolor=shaded, edgecolor="black"))
        ax.text(u, v, f"${names.get(site, site)}$", ha="center", va="center", fontsize=13)
        _dist_label(ax, (u, v), relations["sample_dist"][site], (label_side or {}).get(site, "above"))
        for parent in [*relations["sample_sample"][site], *(a for a, b in edges if b == site)]:
            _arrow(ax, pos[parent], (u, v))
    if guide_relations is not None:
        for site, parents in guide_relations["sample_sample"].items():
            for parent in [*(reads or {}).get(site, _same_plate(relations, site)), *parents]:
                _arrow(ax, pos[parent], pos[site], linestyle="--", color="tab:blue", connectionstyle="arc3,rad=0.35")
    for plate, members in relations["plate_sample"].items():
        us, vs = [pos[s][0] for s in members if s in pos], [pos[s][1] for s in members if s in pos]
        ax.add_patch(Rectangle((min(us) - 0.17, min(vs) - 0.17), max(us) - min(us) + 0.34, max(vs) - min(vs) + 0.4,
                               fill=False))
        ax.text(max(us) + 0.15, min(vs) - 0.15, f"plate {plate!r}", ha="right", va="bottom", fontsize=8)
    ax.set_xlim(0, size[0] / size[1])
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_axis_off()
    return fig
