import pytest
import torch

from delta_influence.attacks import BadNets
from delta_influence.datamodules import PoisonedDataModule


def test_badnets_sets_only_the_trigger_pixels_in_every_channel():
    images = torch.full((2, 3, 32, 32), 0.5)
    out = BadNets().apply_trigger(images)
    changed = (out != images).any(dim=(0, 1))
    assert set(map(tuple, torch.nonzero(changed).tolist())) == {(28, 30), (30, 30), (29, 29), (30, 28)}
    assert (out[:, :, 28, 30] == 0).all()
    assert torch.equal(images, torch.full((2, 3, 32, 32), 0.5))  # input untouched


def test_select_poisons_is_seeded_and_takes_victims_only():
    labels = torch.arange(100) % 10
    attack = BadNets(victim=8, target=5, num_poisons=6)
    first = attack.select_poisons(labels, torch.Generator().manual_seed(3))
    again = attack.select_poisons(labels, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert (labels[first] == 8).all() and len(first.unique()) == 6
    assert torch.equal(first, first.sort().values)


@pytest.mark.parametrize(
    "attack, match",
    [
        (BadNets(victim=10, target=5), r"attack.victim=10 is out of range.*0..9"),
        (BadNets(victim=8, target=-1), r"attack.target=-1 is out of range"),
        (BadNets(victim=3, target=3), r"victim and attack.target are both 3"),
    ],
)
def test_attack_classes_are_checked(attack, match):
    with pytest.raises(ValueError, match=match):
        attack.check(num_classes=10)


def test_too_many_poisons_names_the_argument_and_the_fix():
    with pytest.raises(ValueError, match=r"attack.num_poisons=11 is more than the 10 .* lower attack.num_poisons"):
        BadNets(num_poisons=11).select_poisons(torch.arange(100) % 10, torch.Generator())


def test_trigger_outside_the_image_is_refused():
    with pytest.raises(ValueError, match=r"\(28, 30\), outside the 16x16 images"):
        BadNets().apply_trigger(torch.zeros(1, 16, 16))


def test_a_trigger_the_augmentation_cuts_or_mirrors_is_warned_about_at_set_up():
    pixels = tuple((row, col) for row in (1, 2, 3) for col in (10, 11, 12))  # a 3x3 patch at rows 1-3
    patch = BadNets(victim=8, target=5, num_poisons=10, pixels=pixels, value=1.0)
    (crop,) = patch.augmentation_warnings(32, 32, crop_padding=2, flip=False)
    assert "(1, 10), (1, 11), (1, 12) lie within data.crop_padding=2" in crop and "(2, 10)" not in crop
    assert "Move the trigger at least 2 pixels from the edges, or lower data.crop_padding" in crop
    assert patch.augmentation_warnings(32, 32, crop_padding=1, flip=False) == []
    (mirror,) = patch.augmentation_warnings(32, 32, crop_padding=0, flip=True)
    assert "not mirror-symmetric and data.flip is on" in mirror and "set data.flip false" in mirror
    symmetric = BadNets(pixels=((10, 15), (10, 16)))  # columns 15 and 16 swap under a flip of 32 columns
    assert symmetric.augmentation_warnings(32, 32, crop_padding=4, flip=True) == []
    data = PoisonedDataModule("digits", attack=patch, per_class=20, crop_padding=2, flip=False)
    with pytest.warns(UserWarning, match=r"attack.pixels \(1, 10\).*data.crop_padding=2"):
        data.setup()
