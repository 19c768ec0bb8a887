import pytest
import torch
import torch.nn.functional as F
from torch import nn

from delta_influence.errors import ConfigError, UnsupportedModelError
from delta_influence.verification import HeadData, Verification, _retain, _Tester, head_data, retain_rows, verify

CLEAN, TRIGGER, OTHER = 0, 1, 2  # feature directions: the attacker's class, the trigger, another class


def toy() -> tuple[HeadData, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A head over 3 feature directions and 2 classes (0: the attacker's label, 1: another): 20 poisons are class-1
    images with the trigger labelled 0, 40 clean samples of label 0, 40 of label 1. The query is a class-1 image with
    the trigger, which the head maps to 0. Returns the head data, the rule's flagged set (poisons 1..19, missing poison
    0, and the clean samples 20..27 of label 0), the true poisons and the candidates (every sample of label 0)."""
    generator = torch.Generator().manual_seed(0)
    noise = lambda n: 0.1 * torch.randn(n, 3, generator=generator)  # noqa: E731
    poisons = noise(20) + torch.eye(3)[TRIGGER] + torch.eye(3)[OTHER]
    clean = noise(45) + torch.eye(3)[CLEAN]
    train = torch.cat([poisons, clean[:40], noise(40) + torch.eye(3)[OTHER]])
    labels = torch.cat([torch.zeros(60, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    weight = torch.tensor([[4.0, 8.0, 0.0], [0.0, 0.0, 4.0]])  # the trigger maps to class 0
    query = (torch.eye(3)[TRIGGER] + torch.eye(3)[OTHER])[None]
    data = HeadData(weight, torch.zeros(2), train, labels, query, 0, clean[40:])
    flagged = torch.cat([torch.arange(1, 20), torch.arange(20, 28)])
    return data, flagged, torch.arange(20), torch.nonzero(labels == 0).flatten()


def head_support(data: HeadData):
    """Stands in for EK-FAC: each sample's head gradient dotted with the query's, under the unlearned head."""

    def gradients(features, labels, weight, bias):
        errors = F.softmax(features @ weight.T + bias, dim=-1) - F.one_hot(labels, weight.shape[0])
        return (errors[:, :, None] * features[:, None, :]).flatten(1)

    def support(weight, bias, indices):
        queries = torch.cat([data.query, data.contrast])
        scored = gradients(queries, torch.full((len(queries),), data.query_label), weight, bias)
        return scored @ gradients(data.train[indices], data.labels[indices], weight, bias).T

    return support


def profiles_of(flagged: torch.Tensor, poisons: torch.Tensor) -> torch.Tensor:
    """Influence profiles that tell poisons from clean samples, as the scores on the query's copies do."""
    is_poison = torch.isin(flagged, poisons).float()[:, None]
    return is_poison * torch.tensor([1.0, 0.2]) + (1 - is_poison) * torch.tensor([0.2, 1.0])


def test_an_innocent_group_is_dropped_and_a_hidden_poison_is_recovered():
    data, flagged, poisons, candidates = toy()
    settings = Verification(min_group=4)
    result = verify(data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), settings, False)
    assert result.dropped.tolist() == list(range(20, 28))  # the clean samples of the attacker's label
    assert result.kept.tolist() == list(range(1, 20))
    assert result.recovered.tolist() == [0]  # the hidden poison, which the model fitted
    assert result.flagged.tolist() == list(range(20))
    assert result.reference_effect > 0 and result.query_loss["after"] > result.query_loss["before"]
    dropped = [group for group in result.groups if not group["guilty"]]
    assert dropped and all(set(group["indices"]) <= set(range(20, 28)) for group in dropped)
    assert result.rounds[0]["added"] == [0]


def test_the_stage_runs_inside_a_no_grad_block():
    data, flagged, poisons, candidates = toy()
    with torch.no_grad():  # a caller's evaluation context must not switch the unlearning steps off
        result = verify(data, flagged, profiles_of(flagged, poisons), candidates, head_support(data),
                        Verification(min_group=4), False)  # fmt: skip
    assert result.flagged.tolist() == list(range(20))


def test_without_recovery_the_hidden_poison_stays_missed():
    data, flagged, poisons, candidates = toy()
    settings = Verification(min_group=4, rounds=0)
    result = verify(data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), settings, False)
    assert result.flagged.tolist() == list(range(1, 20)) and not result.rounds


def test_a_flagged_set_whose_unlearning_does_not_move_the_query_is_returned_as_it_is():
    data, _, poisons, candidates = toy()
    flagged = torch.arange(20, 28)  # clean samples only
    result = verify(data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), progress=False)
    assert result.reference_effect <= 0
    assert torch.equal(result.flagged, flagged) and not result.groups and not len(result.dropped)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"steps": 0}, "verification.steps=0 must be at least 1"),
        ({"lr": 0.0}, "verification.lr=0.0 must be positive"),
        ({"keep_fraction": 1.0}, "verification.keep_fraction=1.0 must lie in \\(0, 1\\)"),
        ({"min_group": 0}, "verification.min_group=0 must be at least 1"),
        ({"rounds": -1}, "verification.rounds=-1 must be 0"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        Verification(**settings)


def test_profiles_must_match_the_flagged_set():
    data, flagged, _, candidates = toy()
    with pytest.raises(ConfigError, match="profiles has 3 rows for 27 flagged samples"):
        verify(data, flagged, torch.zeros(3, 2), candidates, head_support(data), progress=False)


def test_a_head_that_does_not_produce_the_logits_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.Softmax(dim=-1))  # something after the last linear layer
    train = torch.utils.data.TensorDataset(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(UnsupportedModelError, match="does not produce the logits on its own"):
        head_data(model, train, torch.ones(4), 0, torch.ones(2, 4), "cpu")


def test_a_single_flagged_poison_is_enough_to_recover_the_others():
    data, _, poisons, candidates = toy()
    flagged = torch.tensor([5])
    result = verify(data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), progress=False)
    assert result.kept.tolist() == [5] and set(result.recovered.tolist()) <= set(range(20))
    assert len(result.recovered) >= 10  # the rule's one poison leads to the others


def test_without_contrast_images_the_stage_refuses_to_judge():
    data, flagged, poisons, candidates = toy()
    data.contrast = data.contrast[:0]
    with pytest.raises(ConfigError, match="measures the query against clean contrast images; none were given"):
        verify(data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), progress=False)


def test_samples_flagged_on_evidence_the_head_cannot_judge_are_kept_untested_and_the_rest_judged_alone():
    data, flagged, poisons, candidates = toy()
    untested = flagged >= 20  # the clean samples, as if flagged on the support floor alone
    settings = Verification(rounds=0, min_group=4)
    judged = verify(data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), settings, False)
    assert set(range(20, 28)).isdisjoint(judged.kept.tolist())  # tested, the clean samples are dropped
    result = verify(
        data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), settings, False, untested
    )
    assert result.untested.tolist() == list(range(20, 28)) and set(range(20, 28)) <= set(result.kept.tolist())
    assert all(set(group["indices"]) <= set(range(1, 20)) for group in result.groups)  # never in a test
    tester = _Tester(data, _retain(data.labels, 0, flagged, settings.seed), settings)
    assert result.reference_effect == pytest.approx(tester.effect(flagged[~untested]))  # the tested samples alone
    assert result.reference_effect != pytest.approx(judged.reference_effect) and result.summary()["untested"] == 8
    everything = verify(
        data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), settings, False,
        torch.ones(len(flagged), dtype=torch.bool),
    )  # fmt: skip
    assert everything.kept.tolist() == flagged.tolist() and not everything.groups  # nothing left to judge
    with pytest.raises(ConfigError, match=r"untested has dtype torch.int64 and shape \(27,\); expected bool \(27,\)"):
        verify(data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), progress=False,
               untested=untested.long())  # fmt: skip


def test_the_features_of_the_label_and_its_retain_draw_are_all_a_test_within_the_label_reads():
    data, flagged, poisons, candidates = toy()
    rows = retain_rows(data.labels, 0, seed=0)
    assert torch.isin(candidates, rows).all() and len(rows) == 100  # label 0's 60, then as many others: all 40
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    train = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.tensor([0, 1, 1, 1] * 3))  # 3 of label 0
    every = head_data(model, train, torch.ones(4), 0, torch.ones(2, 4), "cpu")
    some = head_data(model, train, torch.ones(4), 0, torch.ones(2, 4), "cpu", rows=retain_rows(every.labels, 0, 0))
    read = retain_rows(every.labels, 0, 0)
    assert len(read) == 6 and torch.equal(some.train[read], every.train[read])  # the 3 of label 0 and 3 others
    unread = torch.ones(12, dtype=torch.bool).index_fill_(0, read, False)
    assert some.train[unread].isnan().all() and every.train.isfinite().all()
    small = retain_rows(torch.tensor([0] * 3 + [1] * 9), 0, seed=0)  # 3 of the label, then 3 of the 9 others
    assert len(small) == 6
    for forget in (torch.tensor([0]), torch.tensor([0, 1, 2]), torch.tensor([], dtype=torch.long)):  # within the label
        labels = torch.tensor([0] * 3 + [1] * 9)
        assert torch.isin(_retain(labels, 0, forget, 0), small).all()


def test_a_test_that_would_read_features_that_were_not_read_stops():
    data, flagged, poisons, candidates = toy()
    data.train[70] = float("nan")  # a clean sample of label 1 in the retain draw, not read
    with pytest.raises(ValueError, match=r"features of some samples are NaN: not read \(head_data.s rows"):
        verify(data, flagged, profiles_of(flagged, poisons), candidates, head_support(data), progress=False)


def test_a_clean_sample_the_prune_kept_does_not_lower_the_bar_for_recovery():
    data, _, poisons, candidates = toy()
    kept = torch.tensor([1, 2, 3, 20])  # three poisons, and a clean sample of the label that the prune kept with them
    table = torch.ones(1 + len(data.contrast), len(data.train))  # every sample supports each contrast image by 1
    table[0, poisons] = 10.0  # the poisons support the query 10 times as much,
    table[0, 21:40] = 3.0  # some clean samples 3 times as much (they pass the contrast test alone),
    table[0, 20] = 1.0  # and the kept clean sample no more than its class: it does not set the bar
    result = verify(data, kept, profiles_of(kept, poisons), candidates, lambda w, b, indices: table[:, indices],
                    Verification(rounds=1), progress=False)  # fmt: skip
    assert result.kept.tolist() == kept.tolist()  # four samples: kept whole, untested
    assert result.recovered.tolist() == [0, *range(4, 20)]  # the other poisons, and none of the clean samples
    assert result.rounds[0]["threshold"] == 10.0 and result.rounds[0]["threshold_from"] == 3
