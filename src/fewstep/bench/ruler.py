"""The "ruler" section: the emoji ruler checked on itself (:mod:`fewstep.eval.sanity`), the feature network
(``models/emoji-features``) beside the 9-group classifier's features that scored FID before it. Seconds of work:
``fewstep bench --only ruler --reuse OLD/bench.json``."""

from __future__ import annotations

from pathlib import Path

from ..eval.evaluate import Ruler, dataset_ruler
from ..eval.sanity import DAMAGES, sanity_rows
from ..nets.classifier import load_classifier


def measure(models_dir: Path, settings, command: str = "") -> dict:
    """Each damage's FID (± spread), precision and recall on both feature sets, ``settings.num`` images (≥ 300)."""
    if not (models_dir / "emoji-features").is_dir():
        return {}
    ruler = dataset_ruler("emoji", models_dir)
    old = Ruler(load_classifier(models_dir / "emoji-classifier"), ruler.data)
    num = min(max(300, settings.num), len(ruler.data))
    return {"command": command, "num": num, "seed": settings.seed, "features": ruler.name,
            "features_view_accuracy": ruler.feature_net.config.heldout_accuracy,
            "rows": {r.name: sanity_rows(r, num, settings.seed) for r in (ruler, old)}}


def _cell(rows: dict, name: str) -> str:
    r, floor = rows[name], rows["real"]
    beyond = name == "real" or r["fid"] - floor["fid"] > r["fid_std"] + floor["fid_std"]
    return f"{r['fid']:.2f} ± {r['fid_std']:.2f}" + ("" if beyond else " (within the floor's spread)")


def section(report) -> list[str]:
    g = getattr(report, "ruler", None) or {}
    if not g:
        return []
    names = list(g["rows"])
    lines = ["", "## The ruler", "",
             f"Written by `{g['command']}`. FID of {g['num']} real emoji (seed {g['seed']}) against all 3,655, then of "
             "the same images damaged, on the feature network `emoji-features` (instance discrimination with a group "
             f"head; it names the image behind a fresh augmented view of each with accuracy "
             f"{g['features_view_accuracy']:.3f}) beside the 9-group classifier's features (`emoji-classifier`), "
             "which scored every emoji FID before it. Spreads: bootstrap over the images. A damage the ruler cannot "
             "see is one whose FID is within the spreads of the real images' floor.", "",
             "| images | " + " | ".join(f"FID on `{n}`" for n in names) + " | " +
             " | ".join(f"precision / recall on `{n}`" for n in names) + " |",
             "|---|" + "---:|" * (2 * len(names))]
    for damage in DAMAGES:
        cells = [_cell(g["rows"][n], damage) for n in names]
        pr = [f"{g['rows'][n][damage]['precision']:.2f} / {g['rows'][n][damage]['recall']:.2f}" for n in names]
        lines.append(f"| {damage} | " + " | ".join(cells + pr) + " |")
    return lines
