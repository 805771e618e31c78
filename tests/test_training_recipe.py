"""Pure pieces of the training recipe, checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from skinscan.labels import CLASSES
from skinscan.model.bundle import BundleError, referral_threshold
from skinscan.model.colour import apply_colour_constancy, shades_of_gray
from training.calibration import operating_points
from training.config import TrainConfig
from training.partial_labels import allowed_classes, allowed_mask, partial_label_loss
from training.train import make_scheduler


def test_shades_of_gray_removes_a_colour_cast() -> None:
    rng = np.random.default_rng(0)
    scene = rng.uniform(60, 200, size=(32, 32, 1)).repeat(3, axis=2)  # a grey scene
    cast = np.clip(scene * np.array([1.0, 0.8, 0.6]), 0, 255).astype(np.uint8)  # under a warm light
    fixed = shades_of_gray(cast).astype(np.float64)
    means = fixed.reshape(-1, 3).mean(0)
    assert means.max() - means.min() < 0.03 * means.mean()  # grey again
    before = cast.reshape(-1, 3).mean(0)
    assert before.max() - before.min() > 0.3 * before.mean()


def test_shades_of_gray_tables_match_the_float_formula() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    img[..., 2] //= 2  # a blue deficit to correct
    x = img.astype(np.float64)
    illuminant = np.mean(x**6, axis=(0, 1)) ** (1 / 6)
    expected = np.clip(x * np.linalg.norm(illuminant) / (illuminant * np.sqrt(3)), 0, 255).astype(np.uint8)
    got = shades_of_gray(img)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.mean(got != expected) < 0.001


def test_shades_of_gray_leaves_grey_alone_and_none_is_identity() -> None:
    grey = np.full((8, 8, 3), 120, dtype=np.uint8)
    assert np.array_equal(shades_of_gray(grey), grey)
    black = np.zeros((4, 4, 3), dtype=np.uint8)
    assert np.array_equal(shades_of_gray(black), black)
    tinted = np.zeros((4, 4, 3), dtype=np.uint8) + np.array([200, 100, 50], dtype=np.uint8)
    assert apply_colour_constancy(tinted, "none") is tinted
    with pytest.raises(ValueError, match="unknown colour constancy"):
        apply_colour_constancy(tinted, "retinex")


def test_isic2017_neither_allows_every_class_but_melanoma_and_keratosis() -> None:
    assert allowed_classes("nv", "isic2017") == ("akiec", "bcc", "df", "nv", "vasc")
    assert allowed_classes("mel", "isic2017") == ("mel",)
    assert allowed_classes("nv", "ham10000") == ("nv",)
    mask = allowed_mask(["nv", "bkl"], ["isic2017", "ham10000"])
    assert mask.tolist() == [[True, True, False, True, False, True, True],
                             [False, False, True, False, False, False, False]]


def test_partial_label_loss_is_cross_entropy_for_one_class() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, len(CLASSES))
    y = torch.tensor([0, 1, 2, 4, 5, 6])
    mask = torch.nn.functional.one_hot(y, len(CLASSES)).bool()
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(partial_label_loss(logits, mask, smoothing=0.1), expected, atol=1e-6)


def test_partial_label_loss_by_hand() -> None:
    # Logits 0 everywhere but 2 on class 0: P = e^2 / (e^2 + 6) for class 0, 1 / (e^2 + 6) for each other.
    logits = torch.zeros(1, 7)
    logits[0, 0] = 2.0
    mask = torch.zeros(1, 7, dtype=torch.bool)
    mask[0, [0, 1]] = True  # the label allows classes 0 and 1
    z = math.e**2 + 6
    expected = -math.log((math.e**2 + 1) / z)
    assert partial_label_loss(logits, mask).item() == pytest.approx(expected, rel=1e-6)
    # Weights: two rows, the second weighted 3x.
    both = torch.cat([logits, torch.zeros(1, 7)])
    masks = torch.cat([mask, torch.ones(1, 7, dtype=torch.bool)])  # the second row allows all: loss 0
    assert partial_label_loss(both, masks, torch.tensor([1.0, 3.0])).item() == pytest.approx(expected / 4, rel=1e-6)


def test_operating_points_by_hand() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    score = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05, 0.01])
    points = {p["target_sensitivity"]: p for p in operating_points(y, score, (0.5, 0.75, 1.0))}
    # Sensitivity 0.5 needs the top two malignant scores: threshold 0.8, nothing benign flagged.
    assert points[0.5] == {"target_sensitivity": 0.5, "threshold": 0.8, "sensitivity": 0.5, "specificity": 1.0,
                           "flag_rate": 0.2}
    # 0.75: threshold 0.6, flags 0.9, 0.8, 0.7 (benign), 0.6.
    assert points[0.75]["threshold"] == 0.6 and points[0.75]["specificity"] == pytest.approx(5 / 6)
    assert points[0.75]["flag_rate"] == pytest.approx(0.4)
    # 1.0: threshold 0.3 flags 0.9, 0.8, 0.7, 0.6, 0.4, 0.3.
    assert points[1.0]["threshold"] == 0.3 and points[1.0]["flag_rate"] == pytest.approx(0.6)


def test_referral_threshold_follows_the_setting() -> None:
    meta = {"version": "v1", "referral": {"malignancy_threshold": 0.2, "operating_points": [
        {"target_sensitivity": 0.9, "threshold": 0.3}, {"target_sensitivity": 0.95, "threshold": 0.15}]}}
    assert referral_threshold(meta) == 0.2
    assert referral_threshold(meta, 0.95) == 0.15
    with pytest.raises(BundleError, match="offers: 0.9, 0.95"):
        referral_threshold(meta, 0.8)


def test_a_bundle_without_operating_points_keeps_its_threshold() -> None:
    assert referral_threshold({"version": "old", "referral": {"malignancy_threshold": 0.16}}, 0.95) == 0.16


def _head_and_backbone() -> torch.optim.Optimizer:
    """AdamW over a head at the full rate and a backbone at 0.3 of it, as param_groups lays them out."""
    head, backbone = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [head], "lr": 1e-3, "lr_scale": 1.0},
                              {"params": [backbone], "lr": 3e-4, "lr_scale": 0.3}])


def _rates(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list:
    out = []
    for _ in range(steps):
        out.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_learning_rate_warms_up_linearly_then_decays_by_cosine() -> None:
    # 8 steps an epoch, 3 epochs: warm-up over 0.5 epoch = 4 steps, then cosine over the other 20 steps to zero.
    cfg = TrainConfig(data="d", out="o", lr=1e-3, epochs=3, warmup_epochs=0.5)
    optimizer = _head_and_backbone()
    rates = _rates(optimizer, make_scheduler(optimizer, cfg, 8), 25)
    expected = {
        0: 1e-3 / 4, 1: 2e-3 / 4, 3: 1e-3,  # warm-up: (step + 1) / 4 of the peak
        4: 1e-3,  # cosine from the peak: 0.5 * (1 + cos(pi * (step - 4) / 20))
        9: 1e-3 * 0.5 * (1 + math.sqrt(0.5)),  # a quarter of the way: cos(pi / 4)
        14: 0.5e-3,  # halfway
        19: 1e-3 * 0.5 * (1 - math.sqrt(0.5)),
        24: 0.0,  # the end of the last epoch
    }
    for step, lr in expected.items():
        assert rates[step][0] == pytest.approx(lr, abs=1e-12), step
        assert rates[step][1] == pytest.approx(0.3 * lr, abs=1e-12), step  # the backbone keeps its share
    assert max(r[0] for r in rates) == pytest.approx(1e-3)


def test_a_resumed_schedule_follows_the_new_number_of_epochs() -> None:
    # Two epochs done of a run now extended to four: step 16 of warm-up 4 + cosine over 28 steps.
    cfg = TrainConfig(data="d", out="o", lr=1e-3, epochs=4, warmup_epochs=0.5)
    optimizer = _head_and_backbone()
    for group in optimizer.param_groups:
        group["lr"] = 1e-9  # what a checkpoint of the shorter run left: replaced by the new schedule's rate
    resumed = make_scheduler(optimizer, cfg, 8, start_step=16)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 12 / 28)))
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.3 * optimizer.param_groups[0]["lr"])
    fresh_optimizer = _head_and_backbone()
    fresh = _rates(fresh_optimizer, make_scheduler(fresh_optimizer, cfg, 8), 33)
    replayed = _rates(optimizer, resumed, 17)
    assert np.allclose(replayed, fresh[16:], rtol=1e-9, atol=1e-15)
    # No warm-up: cosine from the first step.
    flat = TrainConfig(data="d", out="o", lr=1e-3, epochs=1, warmup_epochs=0)
    optimizer = _head_and_backbone()
    rates = _rates(optimizer, make_scheduler(optimizer, flat, 8), 9)
    assert [r[0] for r in rates] == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(9)])
