"""ACT's balance of gradients: ‖∇θ L_G‖ / ‖∇θ L_CT‖ on the emoji testbed, per distance (issue 30).

ACT's λ = 0.3 (kong13661/ACT train_cifar10.py) was tuned with LPIPS as the consistency distance. What λ means
depends on how the adversarial gradient compares with the consistency one, and that depends on the distance:
this script measures both gradient norms on the student fewstep's ACT trains (the testbed's UNet, width 32, at
initialisation and halfway through the fitted curriculum's levels), a fresh discriminator, 32 emoji, for l2 and
for the feature distance that stands in for LPIPS:

    python bench/act_balance.py         # writes bench/results/act_balance.json; `fewstep bench --render-only` shows it
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fewstep.core.denoisers import EDMDenoiser, cm_scalings
from fewstep.core.schedules import EDMSchedule
from fewstep.models.data import load_dataset
from fewstep.nets.discriminator import Discriminator
from fewstep.nets.unets import build_unet
from fewstep.objectives.consistency import ConsistencyLoss
from fewstep.objectives.curricula import Curriculum
from fewstep.objectives.distances import get_distance

ROOT = Path(__file__).resolve().parents[1]
OUT, FEATURES = ROOT / "bench" / "results" / "act_balance.json", ROOT / "models" / "emoji-features"
STEPS, AT, BATCH, SEEDS = 800, 400, 32, (0, 1, 2)


def _norm(grads) -> float:
    return float(sum(g.square().sum() for g in grads if g is not None).sqrt())


def ratio(distance: str, seed: int) -> dict:
    """Both gradient norms for one seed (network weights, batch, levels and noise)."""
    torch.manual_seed(seed)
    data = load_dataset("emoji", 32, 3)
    model = EDMDenoiser(build_unet(32, 3, 9, width=32), scalings=cm_scalings)
    disc = Discriminator(32, 3, 9, width=32)
    objective = ConsistencyLoss(EDMSchedule(), Curriculum.for_method("ct", STEPS, fitted=True),
                                get_distance(distance, FEATURES), condition=lambda b: {"class_labels": b["labels"]})
    objective.step = AT
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:BATCH]
    pair = objective.pair(model, {"images": data.images[index], "labels": data.labels[index]})
    params = list(model.parameters())
    ct = _norm(torch.autograd.grad(pair.loss(objective.distance), params, retain_graph=True, allow_unused=True))
    gan = F.softplus(-disc(pair.online, pair.sigma, class_labels=pair.cond["class_labels"])).mean()
    g = _norm(torch.autograd.grad(gan, params, allow_unused=True))
    return {"grad_ct": ct, "grad_g": g, "ratio": g / ct}


def main() -> None:
    rows = {}
    for distance in ("l2", "features"):
        runs = [ratio(distance, s) for s in SEEDS]
        r = torch.tensor([x["ratio"] for x in runs])
        rows[distance] = {"runs": runs, "ratio_mean": float(r.mean()), "ratio_std": float(r.std()),
                          "lambda_ratio_at_0.3": float(r.mean()) * 0.3 / 0.7}
        print(distance, rows[distance]["ratio_mean"], flush=True)
    OUT.write_text(json.dumps({"command": "python bench/act_balance.py", "date": time.strftime("%Y-%m-%d"),
                               "steps": STEPS, "at_step": AT, "batch": BATCH, "seeds": list(SEEDS),
                               "distances": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
