"""The emoji pixel testbed of ``fewstep bench`` (issue 17): the CIFAR-10 analogue of the CM, ACT and Meng et
al. experiments — the emoji at 32×32 RGB, class-conditional on their 9 Unicode groups, in pixel space, far
from saturating the ruler (the teacher's FID is ~8, its accuracy ~0.6, where digits models sit at 0.1–0.4
and 100%).

Measured with the emoji ruler (FID/KID/precision/recall on the emoji feature network's features against all
3,655 emoji, accuracy with the group classifier; the section records which network gave the features): the
teacher with each solver at 1 … 25 steps without guidance and at its default s = 2, and with DPM-Solver++ at each
guidance scale of :data:`TEACHER_GUIDANCE` (so "the teacher's best" ranges over guidance too), every student beside it (consistency models at 1, 2, 4 steps;
the guided student at 4, 8, 25; the progressive students at the steps they serve; another teacher of the testbed,
such as the flow-matching ``emoji-pixel-flow``, with its own sampler and DPM-Solver++, its students also against its
own best), zero-shot editing
(colorization of grayscale emoji included) and the costs. Rendered with the digits section's columns.

``fewstep bench --only emoji-pixel --reuse OLD/bench.json`` runs just this section; a model whose weights
have not changed since that report (same sample count and seed) keeps its rows, so adding a student
measures only the student. The rows are also written to ``OUT/emoji_pixel.progress.json`` as each model is
done, and a run that was stopped takes them from there: the section costs hours on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..eval.evaluate import ruler_for
from ..io.atomic import write_text
from ..models.folders import is_pipeline_folder, load_model
from ..models.handle import Model
from .format import acc, fid, ratio_cell, teacher_best, teacher_rows, verdict
from .measure import quality_rows
from .pixel import consistency_table, editing_table, measure_editing, training_cost
from .results import features_of, folder_digest, load_report, reusable_rows

TEACHER = "emoji-pixel-teacher"
PROGRESS = "emoji_pixel.progress.json"   # the rows measured so far, beside bench.json
TEACHER_STEPS = {"dpmpp-2m": (1, 2, 4, 8, 16, 25), "heun": (2, 4, 8, 13), "euler": (4, 8, 25)}
TEACHER_GUIDANCE = (1.0, 1.5, 2.0, 3.0)     # s = 1: no guidance; "the teacher's best" ranges over all of them
EVERY_SAMPLER_AT = (1.0, 2.0)               # every sampler at no guidance and the default; DPM-Solver++ at all scales


def teacher_key(sampler: str, guidance: float) -> str:
    """The quality key of the teacher at one sampler and guidance scale ("model/sampler s=G")."""
    return f"{TEACHER}/{sampler} s={guidance:g}"


def students(models_dir: Path, teacher: Model) -> list[Model]:
    """Every pixel model distilled or trained on the teacher's data set, named after it."""
    prefix = TEACHER.removesuffix("-teacher") + "-"
    found = [load_model(p) for p in sorted(models_dir.glob(f"{prefix}*"))
             if p.name != TEACHER and (p / "fewstep.json").exists() and not is_pipeline_folder(p)]
    return [m for m in found if m.config.dataset == teacher.config.dataset]


def student_steps(model: Model) -> tuple[int, ...]:
    if model.config.serves_steps:
        return tuple(sorted(model.config.serves_steps))
    return (1, 2, 4) if model.config.kind == "consistency" else (4, 8, 25)


def samplers(model: Model) -> tuple[str, ...]:
    """A student is measured with its own sampler; another teacher of the testbed (one taking no guidance input,
    e.g. the flow-matching ``emoji-pixel-flow``) with its own and DPM-Solver++, so its best ranges over both."""
    if model.config.kind == "diffusion" and not model.takes_guidance:
        return tuple(dict.fromkeys((model.config.default_sampler, "dpmpp-2m")))
    return (model.config.default_sampler,)


def own_teacher_note(quality: dict) -> list[str]:
    """For a student distilled from another teacher of the testbed (``X-cd`` from ``X``), its ratios to that
    teacher's own best: the flow-matching CD student against the flow teacher."""
    lines = []
    for key, rows in quality.items():
        name = key.split("/")[0]
        parent = name.removesuffix("-cd")
        found = teacher_best(quality, parent) if parent != name and parent != TEACHER else None
        if found is None or not key.endswith("/consistency"):
            continue
        where, best = found
        by = {r["steps"]: r for r in rows}
        cells = ", ".join(f"{n} step{'s' * (n > 1)} {fid(by[n])} ({ratio_cell(by[n], best)})" for n in (1, 2) if n in by)
        lines.append(f"- `{name}` against its own teacher `{parent}`, whose best is FID {fid(best)} ({where}): {cells}.")
    return ["", "Students of the testbed's other teachers, against their own teacher's best:", "", *lines] if lines else []


def fingerprint(model: Model) -> str:
    """A digest of the model folder's weight files (:func:`fewstep.bench.results.folder_digest`)."""
    return folder_digest(model.path)


def _previous(settings, progress: Path | None) -> list[dict]:
    """This section as measured before with the same sample counts and seed: a stopped run's rows
    (``progress``), then the ``--reuse`` report's."""
    found = [json.loads(progress.read_text())] if progress is not None and progress.is_file() else []
    if settings.reuse:
        found.append(load_report(Path(settings.reuse), "give the bench.json of an earlier run to --reuse").emoji_pixel)
    return [s for s in found if s and _same(s, settings)]


def _reusable(sources: list[dict], kind: str, key: str, name: str, digest: str):
    """``kind``/``key`` (quality rows, or a model's editing) from the first source that measured it on the
    same weights of ``name``; None when none did."""
    for src in sources:
        if key in src.get(kind, {}) and src.get("fingerprints", {}).get(name) == digest:
            return src[kind][key]
    return None


def _same(section: dict, settings) -> bool:
    return section.get("num") == settings.num and section.get("edit_num") == settings.edit_num and \
        section.get("seed", 0) == settings.seed


def _scored_on(sections: list[dict], features: str) -> list[dict]:
    """Those scored on the feature network ``features`` (sections from before it name none: the group classifier's
    features). Quality rows are reused only from these; editing (accuracy and PSNR, no FID) from any."""
    return [s for s in sections if features_of(s) == features]


def measure(models_dir: Path, settings, command: str = "", progress: Path | None = None) -> dict:
    """The section's numbers (empty when the testbed's teacher is not there); rows of models whose weights
    match the ``--reuse`` report's (or a stopped run's ``progress`` file's) are taken from there."""
    if not (models_dir / TEACHER).is_dir():
        return {}
    teacher = load_model(models_dir / TEACHER)
    ruler = ruler_for(teacher, models_dir)
    found = students(models_dir, teacher)
    old = _previous(settings, progress)
    same_ruler = _scored_on(old, ruler.name)
    out: dict = {"command": command, "num": settings.num, "edit_num": settings.edit_num, "seed": settings.seed,
                 "features": ruler.name, "quality": {}, "costs": {}, "editing": {}, "fingerprints": {}}

    def rows(model: Model, sampler: str, steps: tuple[int, ...], guidance: float | None, key: str = "") -> None:
        key = key or f"{model.path.name}/{sampler}"
        digest = out["fingerprints"].setdefault(model.path.name, fingerprint(model))
        previous = reusable_rows(_reusable(same_ruler, "quality", key, model.path.name, digest), steps)
        if previous:
            print(f"{key}: reused", flush=True)
            out["quality"][key] = previous
        else:
            out["quality"][key] = quality_rows(model, ruler, steps, sampler, guidance, settings.num, settings.seed)
        save()

    def save() -> None:
        if progress is not None:
            progress.parent.mkdir(parents=True, exist_ok=True)
            write_text(progress, json.dumps(out, indent=1) + "\n")

    for guidance in TEACHER_GUIDANCE:
        for sampler, counts in TEACHER_STEPS.items():
            if guidance in EVERY_SAMPLER_AT or sampler == "dpmpp-2m":
                rows(teacher, sampler, counts[:2] if settings.quick else counts, guidance, teacher_key(sampler, guidance))
    for model in found:
        for sampler in samplers(model):
            rows(model, sampler, student_steps(model), None)
        out["costs"][model.path.name] = training_cost(model)
    editors = [teacher, *(m for m in found if m.config.kind == "consistency" and m.path.name.endswith(("-cd", "-scd")))]
    for model in editors:
        name = model.path.name
        previous = _reusable(old, "editing", name, name, out["fingerprints"][name])
        out["editing"][name] = previous or measure_editing([model], ruler, settings)[name]
        save()
    if progress is not None:
        progress.unlink(missing_ok=True)    # done: the caller writes the section into bench.json
    return out


def _teacher_note(quality: dict) -> list[str]:
    """Where the teacher's lowest FID and its highest accuracy lie (on this testbed they are not the same
    configuration, so "the teacher's best" by FID is named with its accuracy)."""
    found, rows = teacher_best(quality, TEACHER), teacher_rows(quality, TEACHER)
    if found is None or not rows:
        return []
    where, best = found
    sampler, top = max(rows, key=lambda sr: sr[1]["cond_accuracy"] or 0)
    return ["", f"The teacher's best by FID is {where} ({fid(best)}, accuracy {acc(best)}); its highest accuracy is "
                f"{sampler} at {top['steps']} steps ({acc(top)}, FID {fid(top)}). Every ratio to \"the teacher's best\" "
                "below is to the lowest FID."] + _with_steps(quality)


def _with_steps(quality: dict) -> list[str]:
    """How DPM-Solver++'s FID moves from its fewest to its most steps at each guidance scale measured: whether
    the teacher improves with steps, holds, or gets worse (beyond the spread of the difference)."""
    words = {"wins": "improves", "loses": "gets worse", "within the spread": "holds (within the spread)"}
    cells = []
    for key, rows in quality.items():
        if key.startswith(f"{TEACHER}/dpmpp-2m") and len(rows) > 1:
            few, many = min(rows, key=lambda r: r["steps"]), max(rows, key=lambda r: r["steps"])
            mid = [r for r in rows if r["steps"] == 4]
            path = " → ".join(f"{r['fid']:.2f}" for r in [few, *mid, many])
            cells.append(f"s = {rows[0]['guidance_scale']:g}: {path} ({few['steps']}/{'4/' if mid else ''}"
                         f"{many['steps']} steps), {words.get(verdict(many, few), 'no spread measured')}")
    return ["", "With more DPM-Solver++ steps the teacher's FID: " + "; ".join(cells) + "."] if cells else []


def _features(section: dict) -> str:
    name = features_of(section)
    return ("the feature network `emoji-features` (the ruler's FID features, \"The ruler\")" if name == "emoji-features"
            else f"the features of `{name}` (the 9-group classifier: the ruler before `emoji-features`)")


def section(report) -> list[str]:
    g = getattr(report, "emoji_pixel", None) or {}
    if not g:
        return []
    lines = ["", "## The emoji pixel testbed (the CIFAR-10 analogue)", "",
             (f"Written by `{g['command']}`. " if g.get("command") else "") +
             f"The emoji at 32×32 RGB in pixel space, class-conditional on their 9 Unicode groups: `{TEACHER}` and "
             f"its students, {g['num']} samples per point (classes in turn, seed as above), scored against all 3,655 "
             f"emoji on {_features(g)}; accuracy by the group classifier. Spreads: bootstrap over the samples.", "",
             "| model | sampler | guidance | steps | NFE | FID | KID (×10³) | precision | recall | cond. acc. |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, rows in g["quality"].items():
        name, sampler = key.split("/")[0], key.split("/")[1].split(" ")[0]
        for r in rows:
            lines.append(f"| {name} | {sampler} | {r['guidance_scale']:g} | {r['steps']} | {r['nfe']} | {fid(r)} | "
                         f"{1e3 * r['kid']:.2f} ± "
                         f"{1e3 * r['kid_std']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {acc(r)} |")
    lines += _teacher_note(g["quality"])
    lines += consistency_table(g["quality"], g["costs"], TEACHER, "### Consistency models on the testbed")
    lines += own_teacher_note(g["quality"])
    lines += editing_table(g.get("editing", {}), g["edit_num"], "emoji", "### Zero-shot editing on the testbed")
    return lines


def act_balance(results: Path) -> list[str]:
    """ACT's gradient balance per distance (``bench/act_balance.py`` → act_balance.json), under the testbed."""
    path = results / "act_balance.json"
    if not path.exists():
        return []
    f = json.loads(path.read_text())
    cells = [f"{name} {d['ratio_mean']:.2f} ± {d['ratio_std']:.2f} (λ = 0.3 weighs them {d['lambda_ratio_at_0.3']:.2f} : 1)"
             for name, d in f["distances"].items()]
    return ["", f"ACT's balance (`{f['command']}`, {f['date']}): ‖∇θ L_G‖ / ‖∇θ L_CT‖ on the testbed's ACT student "
                f"(width 32, level pairs of step {f['at_step']} of {f['steps']}), a fresh discriminator, {f['batch']} emoji, "
                f"mean ± std over {len(f['seeds'])} seeds: " + "; ".join(cells) + ". kong13661/ACT tuned λ = 0.3 with "
                "LPIPS; with l2 the adversarial gradient drowns the consistency one, with the feature distance that "
                "stands in for LPIPS they are on one scale."]
