"""The robustness report's perturbations, the training appearance augmentation, source-balanced sampling, the
squash preprocessing and the class-prior decision rule, each on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from skinscan.model.bundle import decide, resize_crop
from skinscan.model.metrics import classification_report
from training import perturb
from training.calibration import fit_logit_offsets
from training.rundata import source_balanced_weights, variant_subset


def tiny(h: int = 12, w: int = 16) -> np.ndarray:
    """A 12 x 16 image: a grey background, a darker lesion in the middle, a red pixel in a corner."""
    rgb = np.full((h, w, 3), 160, dtype=np.uint8)
    rgb[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = (90, 60, 50)
    rgb[0, 0] = (255, 0, 0)
    return rgb


def test_squash_square_loses_the_aspect_ratio() -> None:
    out = perturb.squash_square(tiny(), side=10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8


def test_crop_square_takes_the_centre() -> None:
    rgb = tiny()
    out = perturb.crop_square(rgb)
    assert out.shape == (12, 12, 3)
    assert np.array_equal(out, rgb[:, 2:14])


def test_pad_square_adds_black_borders() -> None:
    rgb = tiny()
    out = perturb.pad_square(rgb)
    assert out.shape == (16, 16, 3)
    assert not out[:2].any() and not out[-2:].any()
    assert np.array_equal(out[2:14], rgb)


def test_rescale_keeps_the_size_and_blurs() -> None:
    rgb = tiny()
    out = perturb.rescale(rgb, 0.5)
    assert out.shape == rgb.shape
    assert out[0, 0, 1] > 0  # the lone red pixel is smeared with its neighbours
    assert not np.array_equal(out, rgb)


def test_jpeg_is_lossy_but_close() -> None:
    rgb = tiny(32, 32)
    out = perturb.jpeg(rgb, 40)
    assert out.shape == rgb.shape
    diff = np.abs(out.astype(int) - rgb.astype(int))
    assert 0 < diff.mean() < 20


def test_colour_temperature_moves_red_and_blue_apart() -> None:
    rgb = np.full((4, 4, 3), 128, dtype=np.uint8)
    warm, cool = perturb.colour_temperature(rgb, 1.0), perturb.colour_temperature(rgb, -1.0)
    assert warm[0, 0, 0] > 128 > warm[0, 0, 2]
    assert cool[0, 0, 2] > 128 > cool[0, 0, 0]
    assert warm[0, 0, 1] == cool[0, 0, 1] == 128
    assert np.array_equal(perturb.colour_temperature(rgb, 0.0), rgb)


def test_exposure_darkens_and_brightens_in_linear_light() -> None:
    rgb = np.full((4, 4, 3), 128, dtype=np.uint8)
    dark, bright = perturb.exposure(rgb, -1.0), perturb.exposure(rgb, 1.0)
    assert dark.max() < 128 < bright.min()
    # One stop halves linear light: in sRGB-like gamma that is about 0.73 of the value, not half.
    assert 88 <= int(dark[0, 0, 0]) <= 98
    assert perturb.exposure(np.full((2, 2, 3), 250, np.uint8), 1.0).min() == 255  # highlights clip


def test_vignette_blackens_the_corners_only() -> None:
    rgb = np.full((21, 21, 3), 200, dtype=np.uint8)
    out = perturb.vignette(rgb, radius=0.8)
    assert out[0, 0].max() < 20 and out[-1, -1].max() < 20
    assert np.array_equal(out[10, 10], rgb[10, 10])


def test_every_variant_keeps_a_valid_image_and_unknown_names_are_refused() -> None:
    rgb = tiny()
    for name in perturb.VARIANTS:
        out = perturb.apply_variant(name, rgb)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3, name
        assert name in perturb.VARIANT_HELP
    assert np.array_equal(perturb.apply_variant("clean", rgb), rgb)
    with pytest.raises(KeyError, match="unknown perturbation"):
        perturb.apply_variant("sepia", rgb)


def test_random_appearance_is_seeded_and_keeps_shape() -> None:
    rgb = tiny(32, 32)
    a = [perturb.RandomAppearance(np.random.default_rng(3))(rgb) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    outs = [perturb.RandomAppearance(np.random.default_rng(s))(rgb) for s in range(20)]
    assert all(o.shape == rgb.shape and o.dtype == np.uint8 for o in outs)
    assert len({o.tobytes() for o in outs}) > 10


def test_squash_preprocessing_makes_a_file_and_its_square_copy_alike() -> None:
    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((150, 200, 3)) * 255).astype(np.uint8)).resize((200, 150))
    squashed_file = base.resize((256, 256), Image.Resampling.BILINEAR)
    a = np.asarray(resize_crop(base, 64, 64, mode="squash")).astype(int)
    b = np.asarray(resize_crop(squashed_file, 64, 64, mode="squash")).astype(int)
    c = np.asarray(resize_crop(base, 64, 64, mode="crop")).astype(int)
    d = np.asarray(resize_crop(squashed_file, 64, 64, mode="crop")).astype(int)
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).mean() < np.abs(c - d).mean() / 2  # crop mode sees a different lesion shape


def test_decide_with_offsets_moves_only_the_decision() -> None:
    probs = np.array([[0.6, 0.4], [0.45, 0.55]])
    assert decide(probs).tolist() == [0, 1]
    assert decide(probs, np.array([0.0, 0.5])).tolist() == [1, 1]
    assert decide(probs, np.zeros(2)).tolist() == [0, 1]


def test_fit_logit_offsets_raises_balanced_accuracy_on_a_biased_model() -> None:
    rng = np.random.default_rng(0)
    n = 600
    y = rng.choice(3, size=n, p=[0.8, 0.1, 0.1])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 1.5
    logits[:, 0] += 1.5  # the majority class is favoured: rare classes are under-called
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    before = classification_report(y, probs, ["mel", "bcc", "nv"])["balanced_accuracy"]
    offsets = fit_logit_offsets(probs, y)
    after = classification_report(y, probs, ["mel", "bcc", "nv"], logit_offsets=offsets)["balanced_accuracy"]
    assert offsets[0] == 0.0  # anchored on the most frequent class
    assert offsets[1] > 0.5 and offsets[2] > 0.5
    assert after > before + 0.1


def test_source_balanced_weights_give_every_source_the_same_class_mix() -> None:
    classes = 7
    # Main set: 80 nv (5), 10 mel (4), 10 bkl (2). Extra set: 30 mel, 10 bkl, 60 "neither" (partial label).
    labels = np.array([5] * 80 + [4] * 10 + [2] * 10 + [4] * 30 + [2] * 10 + [5] * 60)
    masks = np.zeros((len(labels), classes), dtype=bool)
    masks[np.arange(len(labels)), labels] = True
    masks[140:, :] = True
    masks[140:, [2, 4]] = False
    sources = ["main"] * 100 + ["extra"] * 100
    is_main = np.array([True] * 100 + [False] * 100)
    w, prior = source_balanced_weights(labels, masks, sources, is_main, extra_weight=2.0)
    assert prior.sum() == pytest.approx(1.0)
    main_mel = w[:100][labels[:100] == 4].sum() / w[:100].sum()
    extra_mel = w[100:][labels[100:] == 4].sum() / w[100:].sum()
    assert main_mel == pytest.approx(extra_mel)  # which archive an image came from says nothing about melanoma
    assert w[100:].sum() / w[:100].sum() == pytest.approx(2.0)  # the extra set's share: x extra_weight per image


def test_variant_subset_caps_each_class() -> None:
    labels = np.array([0] * 50 + [1] * 5 + [2] * 20)
    pos = variant_subset(labels, cap=10, seed=0)
    counts = np.bincount(labels[pos])
    assert counts.tolist() == [10, 5, 10]
    assert np.array_equal(pos, np.sort(pos))
