"""ECT (Geng et al. 2024): the r(t) mapping and the stage schedule against locuslab/ect, the loss on a fixed
batch against an independent transcription of its ECMLoss, and `fewstep distill --method ect` end to end."""

import json

import pytest
import torch
from helpers import run_cli, tiny_digits_models, tiny_unet

from fewstep.core.denoisers import EDMDenoiser, cm_scalings
from fewstep.core.schedules import EDMSchedule
from fewstep.models.folders import load_model
from fewstep.objectives.consistency import ConsistencyLoss
from fewstep.objectives.curricula import Curriculum, ect_r, ect_stage
from fewstep.objectives.distances import pseudo_huber_c
from fewstep.sampling.generate import generate


class ECMLossTranscript:
    """locuslab/ect training/loss.py: ECMLoss (lines 11-92), transcribed: sigmoid mapping, a CPU RNG for the
    shared dropout mask (the reference saves torch.cuda's), labels passed as fewstep's class_labels."""

    def __init__(self, P_mean=-1.1, P_std=2.0, q=2, c=0.0, k=8.0, b=1.0):
        self.P_mean, self.P_std, self.q, self.c, self.k, self.b = P_mean, P_std, q, c, k, b
        self.stage = 0

    def update_schedule(self, stage):
        self.stage = stage

    def t_to_r(self, t):
        adj = 1 + self.k * torch.sigmoid(-self.b * t)
        decay = 1 / self.q ** (self.stage + 1)
        ratio = 1 - decay * adj
        r = t * ratio
        return torch.clamp(r, min=0)

    def __call__(self, net, images, labels):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
        t = (rnd_normal * self.P_std + self.P_mean).exp()
        r = self.t_to_r(t)
        y = images
        eps = torch.randn_like(y)
        eps_t = eps * t
        eps_r = eps * r
        rng_state = torch.get_rng_state()
        D_yt = net(y + eps_t, t.flatten(), class_labels=labels)
        if r.max() > 0:
            torch.set_rng_state(rng_state)
            with torch.no_grad():
                D_yr = net(y + eps_r, r.flatten(), class_labels=labels)
            mask = r > 0
            D_yr = torch.nan_to_num(D_yr)
            D_yr = mask * D_yr + (~mask) * y
        else:
            D_yr = y
        loss = (D_yt - D_yr) ** 2
        loss = torch.sum(loss.reshape(loss.shape[0], -1), dim=-1)
        if self.c > 0:
            loss = torch.sqrt(loss + self.c ** 2) - self.c
        else:
            loss = torch.sqrt(loss)
        return loss / (t - r).flatten()


@pytest.mark.parametrize("stage", [0, 1, 3, 7])
@pytest.mark.parametrize("q,k,b", [(2.0, 8.0, 1.0), (256.0, 8.0, 1.0), (2.0, 4.0, 0.5)])
def test_r_of_t_matches_the_reference_mapping(stage, q, k, b):
    t = torch.logspace(-3, 2, 41)
    reference = ECMLossTranscript(q=q, k=k, b=b)
    reference.update_schedule(stage)
    assert torch.allclose(ect_r(t, stage, q, k, b), reference.t_to_r(t), rtol=1e-6, atol=0)
    # and the numbers: stage 0, q = 2 clamps every t < ln 7 to r = 0 (the diffusion loss); later Δt halves
    if (stage, q, k, b) == (0, 2.0, 8.0, 1.0):
        assert (ect_r(t, 0)[t < 1.94] == 0).all() and (ect_r(t, 0)[t > 1.96] > 0).all()
    big = torch.tensor([100.0], dtype=torch.float64)       # sigmoid(−b·t) ≈ 0: Δt = t / q^(stage+1)
    assert (big - ect_r(big, stage, q, k, b)).item() == pytest.approx(100 / q ** (stage + 1), rel=1e-6)


def test_stage_advances_every_run_length_over_stages():
    # run_ecm.sh: 8 stages of 25,000 iterations over 200,000
    assert [ect_stage(s, 200_000) for s in (0, 24_999, 25_000, 50_000, 174_999, 175_000, 199_999, 200_000)] == \
        [0, 0, 1, 2, 6, 7, 7, 7]
    # scaled to a 200-step run: a new stage every 25 steps
    assert [ect_stage(s, 200) for s in range(0, 201, 25)] == [0, 1, 2, 3, 4, 5, 6, 7, 7]
    assert [ect_stage(s, 200) for s in (24, 26, 49)] == [0, 1, 1]
    assert {ect_stage(s, 200, stages=1) for s in range(201)} == {0}          # run_ecm_1hour.sh: never
    assert [ect_stage(s, 10, stages=4) for s in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]   # ⌈s·K/stages⌉


def test_curriculum_draws_the_stage_of_its_step():
    cur = Curriculum.for_method("ect", 800)
    assert (cur.name, cur.target_ema, cur.p_mean, cur.p_std, cur.q, cur.k, cur.b, cur.stages) == \
        ("ect", 0.0, -1.1, 2.0, 2.0, 8.0, 1.0, 8)
    for step, stage in ((0, 0), (99, 0), (100, 1), (450, 4), (799, 7)):
        assert cur.stage(step) == stage
        torch.manual_seed(step)
        r, t = cur.sample_pairs(4096, step, EDMSchedule())
        assert torch.equal(r, ect_r(t, stage))
        assert torch.allclose(cur.weight(r, t), 1 / (t - r))
        # t ~ lognormal(-1.1, 2): its log's mean and spread
        assert t.log().mean().item() == pytest.approx(-1.1, abs=0.1) and t.log().std().item() == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("stage,c", [(0, 0.0), (1, 0.0), (3, 0.03)])
def test_loss_on_a_fixed_batch_equals_ecmloss(stage, c):
    torch.manual_seed(0)
    net = EDMDenoiser(tiny_unet(num_classes=3, dropout=0.3), scalings=cm_scalings).train()   # dropout on
    g = torch.Generator().manual_seed(1)
    batch = {"images": torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, "labels": torch.randint(0, 3, (16,), generator=g)}
    total = 80
    step = next(s for s in range(total) if ect_stage(s, total) == stage)
    objective = ConsistencyLoss(EDMSchedule(), Curriculum.for_method("ect", total), pseudo_huber_c(c),
                                condition=lambda b: {"class_labels": b["labels"]})
    objective.step = step

    torch.manual_seed(7)
    ours, logs = objective(net, batch)
    ours.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    reference = ECMLossTranscript(c=c)
    reference.update_schedule(stage)
    torch.manual_seed(7)
    theirs = reference(net, batch["images"], batch["labels"])
    theirs.mean().backward()
    torch.manual_seed(7)
    r_zero = (ect_r((torch.randn(16) * 2.0 - 1.1).exp(), stage) == 0).sum().item()

    assert logs["stage"] == stage and logs["target_ema"] == 0
    if stage <= 1:
        assert 0 < r_zero < 16            # the batch mixes r = 0 (target = data) and r > 0 (target = network)
    assert ours.item() == pytest.approx(theirs.mean().item(), rel=1e-5)
    for a, b in zip(grads, (p.grad for p in net.parameters())):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_distill_ect_through_the_cli_samples_in_one_and_two_steps(tmp_path, capsys):
    tiny_digits_models(tmp_path)
    out = tmp_path / "digits-ect"
    code, stdout, err = run_cli(capsys, "distill", "--method", "ect", "--teacher", str(tmp_path / "digits-teacher"),
                                "--out", str(out), "--work-dir", str(tmp_path / "run"), "--steps", "4", "--batch", "8",
                                "--ect-stages", "2", "--no-progress")
    assert code == 0, err
    model = load_model(out)
    cfg = model.config
    assert (cfg.kind, cfg.parameterization, cfg.default_sampler) == ("consistency", "cm", "consistency")
    assert cfg.training["method"] == "ect" and "--method ect" in cfg.training["command"]
    assert "--method ect" in (out / "README.md").read_text()
    assert cfg.sampling_sigmas["2"] == [80.0, 0.821, 0.0]
    extra = cfg.training["config"]["extra"]
    assert extra["curriculum"]["name"] == "ect" and extra["stages"] == 2 and extra["curriculum"]["stages"] == 2
    stages = [json.loads(line)["stage"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert stages[-1] == 1
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model.denoiser(x, torch.full((2,), 0.002), class_labels=torch.arange(2)), x)   # f(x, σmin) = x
    for steps in (1, 2):
        images = generate(model, torch.arange(4), steps=steps, seed=0)
        assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all() and images.abs().max() <= 1
    code, _, err = run_cli(capsys, "train", "--method", "ect", "--out", str(tmp_path / "x"))
    assert code != 0 and "ect" in err      # not a teacher-free method


def _cost_file(tmp_path, ect_points, ict_fid2=6.7):
    def point(s, c, e, f):
        return {"step": s, "core_minutes": c, "ict_equivalent_core_minutes": e, "fid_1": 7.0, "fid_1_std": 0.3,
                "fid_2": f, "fid_2_std": 0.3, "acc_1": 0.2, "acc_1_std": 0.02, "acc_2": 0.3, "acc_2_std": 0.02}

    ict = {"steps": 400, "batch": 64, "core_minutes": 32.0, "command": "x", "fid_1": 7.5, "fid_1_std": 0.3,
           "fid_2": ict_fid2, "fid_2_std": 0.3, "acc_1": 0.2, "acc_1_std": 0.02, "acc_2": 0.3, "acc_2_std": 0.02}
    run = {"name": "emoji-pixel-ect", "shipped": True, "run_command": "fewstep distill --method ect", "threads": 1,
           "batch": 64, "run_steps": 50, "load_average": None, "points": [point(*p) for p in ect_points]}
    d = {"command": "python bench/ect_cost.py score", "num": 300, "seed": 0, "ruler": "r", "cores": 2,
         "step_seconds": {"ect": 2.0, "ict": 2.0, "ratio": 1.0}, "start": point(0, 0, 0, 9.0), "ict": ict, "runs": [run]}
    (tmp_path / "ect_cost.json").write_text(json.dumps(d))
    return tmp_path


def test_the_cost_claim_is_computed_from_the_bench_file(tmp_path):
    from fewstep.bench import ect

    assert ect.claim(tmp_path) is None and ect.section(tmp_path) == []          # not measured yet: left out
    here = lambda points: ect.claim(_cost_file(tmp_path, points))[-1]           # noqa: E731
    assert here([(25, 4.0, 2.0, 7.5), (50, 7.5, 4.0, 6.0)]) == "holds (0.23× iCT's cost)"
    assert here([(25, 4.0, 2.0, 7.5), (50, 7.5, 4.0, 6.6)]) == "holds (0.23× iCT's cost; equal within the spread)"
    assert here([(25, 4.0, 2.0, 7.5), (50, 12.0, 4.0, 6.5)]).startswith("holds in compute (iCT-equivalent 0.12×)")
    assert here([(25, 4.0, 2.0, 7.5), (100, 20.0, 16.0, 6.5)]).startswith("does not hold (0.62×")
    assert here([(25, 4.0, 2.0, 7.5), (50, 7.5, 4.0, 6.9)]).startswith("does not hold (ECT's 2-step FID stays above")
    assert "the shipped `emoji-pixel-ect` (50 steps): 6.900 ± 0.300 at 2 steps" in ect.claim(tmp_path)[2]
    lines = ect.section(_cost_file(tmp_path, [(50, 7.5, 4.0, 5.0)]))
    row = next(line for line in lines if line.startswith("| emoji-pixel-ect (shipped) | 50 × 64 |"))
    assert row.startswith("| emoji-pixel-ect (shipped) | 50 × 64 | 7.5 | – | 4.0 |") and row.endswith("| lower |")
    assert any(line.startswith("| start (the teacher's weights) | 0 × 64 |") for line in lines)
