import pytest
import torch

from delta_influence.attacks import BadNets


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
