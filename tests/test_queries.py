import pytest
import torch

from delta_influence.queries import TRANSFORMS, make_queries


def test_queries_start_with_the_original_and_relabel_every_copy():
    image = torch.randn(3, 32, 32)
    queries = make_queries(image, label=5, num_classes=10, num_transforms=50, seed=1)
    assert queries.images.shape == (51, 3, 32, 32) and queries.labels.shape == (51,)
    assert torch.equal(queries.images[0], image) and queries.labels[0] == 5
    assert (queries.labels[1:] != 5).all() and queries.labels.min() >= 0 and queries.labels.max() <= 9
    assert queries.transforms[0] == "original" and set(queries.transforms[1:]) <= set(TRANSFORMS)
    assert len(set(queries.transforms[1:])) == len(TRANSFORMS)  # 50 uniform draws cover all 7


def test_same_seed_same_queries_and_global_rng_untouched():
    image = torch.randn(3, 32, 32)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    first = make_queries(image, 2, 10, 20, seed=7)
    assert torch.equal(torch.rand(3), before)
    second = make_queries(image, 2, 10, 20, seed=7)
    other = make_queries(image, 2, 10, 20, seed=8)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert not torch.equal(first.images, other.images)


def test_labels_are_uniform_over_the_other_classes():
    queries = make_queries(torch.randn(1, 32, 32), label=0, num_classes=3, num_transforms=2000, seed=0)
    counts = torch.bincount(queries.labels[1:], minlength=3)
    assert counts[0] == 0 and abs(counts[1].item() - counts[2].item()) < 200


def test_simple_transforms_are_exact():
    image = torch.randn(3, 32, 32)
    assert torch.equal(TRANSFORMS["hflip"](image), image.flip(-1))
    assert torch.allclose(TRANSFORMS["invert"](image), 1 - image)  # on the normalised tensor, as the reference
    assert torch.equal(TRANSFORMS["channel_swap"](image), image[[1, 0, 2]])
    grey = torch.randn(1, 32, 32)
    assert torch.equal(TRANSFORMS["channel_swap"](grey), grey)


def test_pixel_space_transforms_between_normalisations():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    pixels = torch.rand(3, 32, 32)
    image = (pixels - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    queries = make_queries(image, 1, 10, 30, seed=0, space="pixel", mean=mean, std=std)
    inverted = [k for k, name in enumerate(queries.transforms) if name == "invert"]
    assert inverted
    back = queries.images[inverted[0]] * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    assert torch.allclose(back, 1 - pixels, atol=1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="needs the normalisation's mean and std"):
        make_queries(torch.randn(3, 32, 32), 1, 10, space="pixel")
    with pytest.raises(ValueError, match="label=10 is out of range"):
        make_queries(torch.randn(3, 32, 32), 10, 10)
    with pytest.raises(ValueError, match="larger than 20x20"):
        make_queries(torch.randn(3, 16, 16), 1, 10)
