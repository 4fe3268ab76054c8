"""Sequence-grouped splits and batch augmentation (no files involved)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from unetseg.data import Split, augment_batch, sequence_groups, split_by_sequence
from unetseg.errors import UnetsegError

# Frame numbers shaped like the lab's CARLA names: runs of neighbours with small gaps, big jumps between.
RUNS = [range(26, 46), range(1887, 1915, 2), range(5000, 5030), range(9000, 9004), range(12000, 12040),
        range(20000, 20010), range(33000, 33025)]
CARLA_NAMES = [f"{n:06d}" for r in RUNS for n in r]


def test_sequence_groups_rules():
    names = ["000010", "000011", "000013", "000090", "F61-3", "F61-4", "F62-1", "town_a_0001", "x", "y.png"]
    g = sequence_groups(names)
    assert g[0] == g[1] == g[2]  # gap <= 20: one run
    assert g[3] != g[0]  # jump of 77
    assert g[4] == g[5] and g[6] != g[4]  # prefix before the last -number
    assert len({g[7], g[8], g[9]}) == 3 and g[7] not in g[:7]
    assert sequence_groups(["000010", "000011", "000013"], max_gap=1) == [0, 0, 1]
    # File names and stems group alike; ids do not depend on input order.
    assert sequence_groups(["000002.png", "000001.png", "000500.png"]) == [0, 0, 1]
    assert sequence_groups(["000500", "000001", "000002"]) == [1, 0, 0]


def test_single_shared_prefix_falls_back_to_number_runs():
    names = [f"frame_{i:04d}" for i in list(range(10)) + list(range(100, 110))]
    g = sequence_groups(names)
    assert len(set(g)) == 2 and g[0] == g[9] and g[10] == g[19] and g[0] != g[10]


def test_split_is_deterministic_grouped_and_sized():
    a = split_by_sequence(CARLA_NAMES, val_fraction=0.2, seed=3)
    shuffled = CARLA_NAMES[:]
    random.Random(1).shuffle(shuffled)
    b = split_by_sequence(shuffled, val_fraction=0.2, seed=3)
    assert sorted(a.val_names) == sorted(b.val_names)  # independent of listing order
    assert a.to_dict() == split_by_sequence(CARLA_NAMES, 0.2, seed=3).to_dict()
    assert a.groups == len(RUNS)
    gids = dict(zip(CARLA_NAMES, sequence_groups(CARLA_NAMES), strict=True))
    val_groups = {gids[n] for n in a.val_names}
    assert not val_groups & {gids[n] for n in a.train_names}  # whole groups only
    assert sorted(a.train + a.val) == list(range(len(CARLA_NAMES)))
    assert [CARLA_NAMES[i] for i in a.val] == a.val_names
    n = len(CARLA_NAMES)
    assert 0.1 * n <= len(a.val) <= 0.3 * n
    seeds = {tuple(split_by_sequence(CARLA_NAMES, 0.2, seed=s).val_names) for s in range(6)}
    assert len(seeds) > 1  # the seed matters


def test_split_roundtrip_and_from_names():
    s = split_by_sequence(CARLA_NAMES, 0.25, seed=1)
    d = json.loads(json.dumps(s.to_dict()))
    assert Split.from_dict(d) == s
    reordered = sorted(CARLA_NAMES, reverse=True)
    t = Split.from_names(reordered, d)
    assert sorted(t.val_names) == sorted(s.val_names) and [reordered[i] for i in t.val] == t.val_names
    with pytest.raises(UnetsegError, match="not in the dataset: 000026"):
        Split.from_names([n for n in CARLA_NAMES if n != "000026"], d)


def test_split_edge_cases():
    assert split_by_sequence(CARLA_NAMES, 0.0).val == []
    with pytest.raises(UnetsegError, match="val_fraction"):
        split_by_sequence(CARLA_NAMES, 1.0)
    with pytest.warns(UserWarning, match="one sequence"):
        s = split_by_sequence([f"{i:06d}" for i in range(10)], 0.2)
    assert s.by_frame and len(s.val) == 2 and len(s.train) == 8
    two = split_by_sequence(["000001", "000900"], 0.5)
    assert len(two.val) == 1 and len(two.train) == 1
    one_big = split_by_sequence([f"{i:06d}" for i in range(9)] + ["005000"], 0.5)
    assert one_big.train  # training is never emptied


# ---------------------------------------------------------------------------------------------- augment


def _batch(b=3, h=24, w=32):
    # Masks of big blocks; the image encodes the label so alignment can be checked after augmentation.
    m = torch.zeros(b, h, w, dtype=torch.long)
    m[:, : h // 2, : w // 2] = 1
    m[:, : h // 2, w // 2:] = 2
    m[:, h // 2:, : w // 4] = 3
    m[:, h // 2:, w // 4:] = 4
    x = (m.float() / 10).unsqueeze(1).repeat(1, 3, 1, 1)
    return x, m


def test_augment_shapes_dtypes_and_alignment():
    x, m = _batch()
    g = torch.Generator().manual_seed(0)
    xa, ma = augment_batch(x, m, crop_size=(16, 20), color_jitter=0.0, generator=g)
    assert xa.shape == (3, 3, 16, 20) and xa.dtype == torch.float32
    assert ma.shape == (3, 16, 20) and ma.dtype == torch.int64
    assert set(ma.unique().tolist()) <= {1, 2, 3, 4}
    agree = ((xa[:, 0] * 10).round().long() == ma).float().mean()
    assert agree > 0.9  # bilinear blends only along block edges; geometry is shared


def test_augment_identity_and_flip():
    x, m = _batch()
    xa, ma = augment_batch(x, m, scale_range=(1.0, 1.0), hflip=False, color_jitter=0.0)
    assert torch.equal(xa, x) and torch.equal(ma, m)
    xa, ma = augment_batch(x, m, scale_range=(1.0, 1.0), crop_size=(24, 32), color_jitter=0.0,
                           generator=torch.Generator().manual_seed(5))
    for i in range(3):  # a full-size crop at scale 1 is the image itself or its mirror, exactly
        assert torch.equal(ma[i], m[i]) or torch.equal(ma[i], m[i].flip(-1))
        assert torch.allclose(xa[i], x[i], atol=1e-5) or torch.allclose(xa[i], x[i].flip(-1), atol=1e-5)
        assert torch.equal((xa[i, 0] * 10).round().long(), ma[i])


def test_augment_reproducible_and_jitter_in_range():
    x = torch.rand(2, 3, 16, 16)
    m = torch.randint(0, 5, (2, 16, 16))
    a = augment_batch(x, m, crop_size=(12, 12), generator=torch.Generator().manual_seed(7))
    b = augment_batch(x, m, crop_size=(12, 12), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert 0.0 <= float(a[0].min()) and float(a[0].max()) <= 1.0
    big = augment_batch(x, m, crop_size=(24, 40), generator=torch.Generator().manual_seed(1))
    assert big[0].shape == (2, 3, 24, 40)  # crop larger than the image: scaled up so it fits
    with pytest.raises(UnetsegError, match="masks"):
        augment_batch(x, m[:, :8], crop_size=(8, 8))


def test_hue_turn_keeps_luma_and_moves_hue() -> None:
    import math

    from unetseg.data.augment import _gray, jitter_colors, rotate_hues

    x = torch.rand(3, 3, 8, 8) * 0.4 + 0.3  # mid-range colours: a turn stays inside [0, 1]
    torch.testing.assert_close(rotate_hues(x, torch.zeros(3)), x, atol=1e-6, rtol=0)
    turned = rotate_hues(x, torch.tensor([0.5, -1.0, math.pi]))
    torch.testing.assert_close(_gray(turned), _gray(x), atol=1e-5, rtol=0)
    assert (turned - x).abs().amax(dim=(1, 2, 3)).min() > 0.02
    red = torch.tensor([0.7, 0.3, 0.3]).view(1, 3, 1, 1)
    green = rotate_hues(red, torch.tensor([-2 * math.pi / 3])).flatten()
    assert green[1] > green[0] and green[1] > green[2]
    # hue 0 draws only the three factors per sample it drew before hue existed, so seeded runs keep their
    # augmentation stream; a hue turn draws one more number per sample
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    jitter_colors(x, 0.2, g1, hue=0.0)
    for _ in range(3):
        torch.rand(len(x), generator=g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    jitter_colors(x, 0.2, g1, hue=0.1)
    assert not torch.equal(g1.get_state(), g2.get_state())
    m = torch.randint(0, 5, (3, 8, 8))
    plain = augment_batch(x, m, hflip=False, scale_range=None, color_jitter=0.0, hue=0.0)
    hued = augment_batch(x, m, hflip=False, scale_range=None, color_jitter=0.0, hue=0.2,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain[1], hued[1]) and not torch.allclose(plain[0], hued[0])
    torch.testing.assert_close(_gray(hued[0]), _gray(x), atol=1e-5, rtol=0)


def test_rare_class_centers_aim_crops_at_rare_pixels() -> None:
    from unetseg.data import augment_batch, rare_class_centers

    masks = torch.zeros(8, 40, 60, dtype=torch.long)
    masks[:, 30, 50] = 5  # one rare pixel far from the centre of each frame
    counts = torch.bincount(masks.reshape(-1), minlength=6)
    g = torch.Generator().manual_seed(0)
    centers = rare_class_centers(masks, counts, probability=1.0, generator=g)
    assert torch.allclose(centers, torch.tensor([[30.5, 50.5]] * 8, dtype=torch.float64))
    images = torch.rand(8, 3, 40, 60)
    _, out = augment_batch(images, masks, crop_size=(16, 16), scale_range=(1.0, 1.0), hflip=True,
                           color_jitter=0.0, generator=g, centers=centers)
    assert (out == 5).any(dim=(1, 2)).all()  # every crop holds the rare pixel, flipped or not
    none = rare_class_centers(masks, counts, probability=0.0, generator=g)
    assert torch.isnan(none).all()


def test_class_mix_pastes_half_of_the_partners_classes_with_their_pixels() -> None:
    from unetseg.data import class_mix

    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[0, :, :4], masks[0, :, 4:] = 1, 2  # sample 0: classes 1 and 2
    masks[1, :4], masks[1, 4:] = 3, 4  # sample 1: classes 3 and 4
    images = (masks.float() / 10).unsqueeze(1).repeat(1, 3, 1, 1)  # each pixel's value names its class
    before = images.clone(), masks.clone()
    out_x, out_m = class_mix(images, masks, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, before[0]) and torch.equal(masks, before[1])  # inputs untouched
    for i in range(2):
        partner = masks[(i + 1) % 2]
        pasted = out_m[i] != masks[i]
        got = set(partner[pasted].unique().tolist())
        assert len(got) == 1 and got <= set(partner.unique().tolist())  # one of the partner's two classes
        c = got.pop()
        assert torch.equal(pasted, partner == c)  # every pixel of that class, nothing else
        assert torch.equal((out_x[i, 0] * 10).round().long(), out_m[i])  # image and mask stay aligned
    same = class_mix(images, masks, 0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same[0], images) and torch.equal(same[1], masks)
    one = class_mix(images[:1], masks[:1], 1.0)
    assert torch.equal(one[1], masks[:1])


def test_rare_paste_copies_the_rare_pixels_of_one_other_sample_and_nothing_else() -> None:
    from unetseg.data import rare_paste

    masks = torch.zeros(3, 8, 8, dtype=torch.long)  # class 0 everywhere: common
    masks[1, 2, 1:3] = 5  # sample 1: a rare object at the left (class 5)
    masks[2, 6, 5] = 7  # sample 2: a rare object at the right (class 7)
    masks[2, :2] = 3  # and a common class 3, never pasted
    images = (masks.float() / 10).unsqueeze(1).repeat(1, 3, 1, 1)  # each pixel's value names its class
    rare = torch.zeros(10, dtype=torch.bool)
    rare[[5, 7]] = True
    before = images.clone(), masks.clone()
    out_x, out_m = rare_paste(images, masks, 1.0, rare, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, before[0]) and torch.equal(masks, before[1])  # inputs untouched
    assert torch.equal((out_x[:, 0] * 10).round().long(), out_m)  # image and mask stay aligned
    for i in range(3):
        changed = out_m[i] != masks[i]
        assert set(out_m[i][changed].tolist()) <= {5, 7}  # only rare classes are pasted
        # every rare pixel of exactly one other sample arrives, mirrored or not (rows 2 and 6 hold no rare
        # pixel of the receiving sample's own, so none is hidden)
        from_one = [int(rare[masks[j]].sum()) for j in range(3) if j != i]
        assert int(changed.sum()) in from_one and set(out_m[i][changed].tolist()) in (set(), {5}, {7})
        assert torch.equal(out_m[i][~changed], masks[i][~changed])
    assert (out_m[:2] == 3).sum() == 0  # class 3 of sample 2 is common: never pasted
    many = rare_paste(images.repeat(8, 1, 1, 1), masks.repeat(8, 1, 1), 1.0, rare,
                      generator=torch.Generator().manual_seed(1))[1]
    mirrored = many[:, 2, 5:7] == 5  # sample 1's object mirrored (columns 1-2 become 5-6)
    assert mirrored.all(1).any() and (many[:, 2, 1:3] == 5).all(1).any()  # both orientations occur
    same = rare_paste(images, masks, 0.0, rare, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same[0], images) and torch.equal(same[1], masks)
    none = rare_paste(images, masks, 1.0, torch.zeros(10, dtype=torch.bool))
    assert torch.equal(none[1], masks)
