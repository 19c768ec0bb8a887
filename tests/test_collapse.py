import pytest
import torch

from delta_influence import detection_metrics, flag_collapsed
from delta_influence.collapse import ratio_split, support_floor_of
from delta_influence.datasets import labels_of
from delta_influence.detectors import DeltaInfluence
from delta_influence.metrics import topk_recall


def test_flags_samples_whose_score_drops_under_enough_copies():
    # sample 0 drops under all 4 copies, sample 1 under 3, sample 2 under 2, sample 3 never
    scores = torch.tensor(
        [
            [10.0, 10.0, 10.0, 1.0],
            [1.0, 1.0, 1.0, 2.0],
            [2.0, 2.0, 2.0, 2.0],
            [3.0, 3.0, 11.0, 2.0],
            [4.0, 12.0, 12.0, 2.0],
        ]
    )
    strict = flag_collapsed(scores, threshold=0.0, tolerance=0)
    assert strict.flagged.tolist() == [0]
    assert strict.counts.tolist() == [4, 3, 2, 0]
    assert torch.equal(strict.deltas, scores[1:] - scores[0])
    assert flag_collapsed(scores, tolerance=1).flagged.tolist() == [0, 1]
    assert flag_collapsed(scores, tolerance=2).flagged.tolist() == [0, 1, 2]


def test_threshold_moves_the_collapse_line():
    scores = torch.tensor([[5.0], [4.0], [4.5]])  # deltas -1.0 and -0.5
    assert flag_collapsed(scores, threshold=-0.4, tolerance=0).flagged.tolist() == [0]
    assert flag_collapsed(scores, threshold=-0.8, tolerance=0).flagged.tolist() == []
    assert flag_collapsed(scores, threshold=-0.8, tolerance=1).flagged.tolist() == [0]
    assert flag_collapsed(scores, threshold=-1.5, tolerance=1).flagged.tolist() == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_refused(bad):
    scores = torch.ones(3, 4)
    scores[1, 2] = bad
    with pytest.raises(ValueError, match="1 NaN or infinite values"):
        flag_collapsed(scores)


def test_tolerance_must_leave_a_rule():
    with pytest.raises(ValueError, match="tolerance=3 must lie in 0..2"):
        flag_collapsed(torch.ones(4, 2), tolerance=3)


def test_detection_metrics_against_known_poisons():
    metrics = detection_metrics(torch.tensor([0, 1, 2, 3]), 10, poisons=torch.tensor([1, 2, 9]))
    assert metrics["flagged"] == 4 and metrics["removed_fraction"] == 0.4
    assert metrics["precision"] == pytest.approx(0.5) and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert "precision" not in detection_metrics(torch.tensor([0]), 10)


def test_topk_recall_counts_poisons_among_the_highest_scores():
    assert topk_recall(torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([0, 3])) == 0.5


def test_the_contrast_keeps_only_samples_of_the_attackers_label_when_told():
    # every sample collapses (score drops on the copy) and supports the query 10x more than the clean class
    scores = torch.tensor([[10.0, 10.0, 10.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    same_label = torch.tensor([True, False, True])
    assert flag_collapsed(scores, tolerance=0, num_contrast=1).flagged.tolist() == [0, 1, 2]
    result = flag_collapsed(scores, tolerance=0, num_contrast=1, same_label=same_label)
    assert result.flagged.tolist() == [0, 2]
    assert result.collapsed.tolist() == [0, 1, 2] and torch.equal(result.same_label, same_label)


@pytest.mark.parametrize(
    ("num_contrast", "same_label", "message"),
    [
        (0, torch.tensor([True, False, True]), "with num_contrast=0 leave it None"),
        (1, torch.tensor([True, False]), r"shape \(2,\); expected bool \[3\]"),
        (1, torch.tensor([1, 0, 1]), r"dtype torch.int64 .* expected bool"),
    ],
)
def test_same_label_must_fit_the_contrast_and_the_training_set(num_contrast, same_label, message):
    with pytest.raises(ValueError, match=message):
        flag_collapsed(torch.ones(3, 3), tolerance=0, num_contrast=num_contrast, same_label=same_label)


def test_labels_come_from_the_datasets_labels_without_loading_its_inputs():
    class Labelled(torch.utils.data.Dataset):
        labels = torch.tensor([3, 1, 3])

        def __len__(self):
            return 3

        def __getitem__(self, index):
            raise AssertionError("the inputs should not be loaded")

    assert labels_of(Labelled()).tolist() == [3, 1, 3]


def test_the_support_floor_flags_samples_of_the_label_that_barely_support_their_clean_class():
    # rows: query, one copy (all collapse), two contrast images. Samples 0-4 carry the label: 0 supports the query
    # far more than the class (a trigger poison), 1-3 support class and query alike (clean members), 4 supports
    # everything little (a clean-label poison fitted to a small loss). Sample 5 carries another label.
    scores = torch.tensor(
        [
            [20.0, 10.0, 12.0, 9.0, 1.0, 1.0],
            [0.0] * 6,
            [1.0, 10.0, 11.0, 8.0, 0.8, 0.1],
            [1.0, 10.0, 9.0, 10.0, 0.8, 0.1],
        ]
    )
    same_label = torch.tensor([True, True, True, True, True, False])
    ratio_alone = flag_collapsed(scores, tolerance=0, num_contrast=2, same_label=same_label)
    assert ratio_alone.flagged.tolist() == [0] and ratio_alone.floor is None
    result = flag_collapsed(scores, tolerance=0, num_contrast=2, same_label=same_label, support_floor=0.3)
    assert result.flagged.tolist() == [0, 4]
    # the label's C: 1, 10, 10, 9, 0.8; the floor is 0.3 times the median of those at or above it (9, 10, 10)
    assert result.floor == pytest.approx(0.3 * 10.0) and result.unsupportive.tolist() == [4]  # 0 passes the ratio
    # a sample that does not collapse is never flagged by the floor
    scores[1, 4] = 5.0
    assert flag_collapsed(scores, 0.0, 0, 2, 2.0, same_label, support_floor=0.3).flagged.tolist() == [0]


def test_the_adaptive_ratio_rises_to_where_the_labels_ratios_split_and_never_falls_below_the_given_one():
    # rows: query, one copy (all collapse), one contrast image. The label's 200 clean members support the query 0.3 to
    # 3.5 times as much as the class (a larger training set spreads them: 48 lie above a ratio of 2); its 40 poisons
    # 12 to 40 times. The last sample carries another label and a ratio of 50.
    clean, poisons = torch.logspace(-0.5, 0.55, 200), torch.linspace(12.0, 40.0, 40)
    query = torch.cat([clean, poisons, torch.tensor([50.0])])
    scores = torch.stack([query, torch.zeros(241), torch.ones(241)])
    same_label = torch.arange(241) < 240
    fixed = flag_collapsed(scores, tolerance=0, num_contrast=1, same_label=same_label)
    assert len(fixed.flagged) == 40 + 48 and fixed.split is None
    adaptive = flag_collapsed(scores, tolerance=0, num_contrast=1, same_label=same_label, adaptive_ratio=True)
    assert 3.5 < adaptive.split < 12.0 and adaptive.contrast_ratio == adaptive.split
    assert adaptive.flagged.tolist() == list(range(200, 240))  # the poisons, none of the other label
    # a split below the given ratio leaves it: the rule never lets more through than contrast_ratio alone
    lower = flag_collapsed(scores, 0.0, 0, 1, 20.0, same_label, adaptive_ratio=True)
    assert lower.split < 20.0 and lower.contrast_ratio == 20.0
    assert lower.flagged.tolist() == (200 + torch.nonzero(poisons > 20.0).flatten()).tolist()
    # too few positive ratios to split, nothing to split them from, or a few outliers alone above: the given ratio
    assert ratio_split(torch.tensor([1.0, 30.0])) is None and ratio_split(-torch.ones(100)) is None
    assert ratio_split(torch.cat([clean, torch.full((3,), 1e6)])) is None
    assert ratio_split(torch.cat([clean, poisons, torch.full((3,), 1e6)])) is None  # they take the upper component
    with pytest.raises(ValueError, match="adaptive_ratio splits the ratios of the attacker's label; pass same_label"):
        flag_collapsed(scores, tolerance=0, num_contrast=1, adaptive_ratio=True)


def test_the_floor_is_set_by_the_members_of_the_label_above_it_so_that_many_poisons_do_not_lower_it():
    # ten clean members (C = 10) and ten clean-label poisons (C = 0, 0.1, ..., 0.9): half of the label, so its plain
    # median is a poison's (0.9) and a floor of 0.1 times it (0.09) would catch one poison
    contrast = torch.cat([torch.full((10,), 10.0), torch.arange(10) / 10])
    scores = torch.stack([torch.full((20,), 0.1), torch.zeros(20), contrast, contrast])  # query, a copy, contrast
    result = flag_collapsed(scores, 0.0, 0, 2, 2.0, torch.ones(20, dtype=torch.bool), support_floor=0.1)
    assert result.floor == pytest.approx(1.0) and result.flagged.tolist() == list(range(10, 20))
    assert support_floor_of(contrast[:10], 0.1) == pytest.approx(1.0)  # the clean members' own floor
    with pytest.raises(ValueError, match="support_floor_of needs 0 <= share < 1 and some scores; got 0.1 and 0"):
        support_floor_of(contrast[:0], 0.1)


@pytest.mark.parametrize(
    ("support_floor", "same_label", "message"),
    [
        (-0.1, torch.ones(3, dtype=torch.bool), r"support_floor=-0.1 must lie in \[0, 1\)"),
        (1.0, torch.ones(3, dtype=torch.bool), r"support_floor=1.0 must lie in \[0, 1\)"),
        (0.3, None, "pass same_label, or support_floor=None"),
    ],
)
def test_bad_support_floors_are_refused(support_floor, same_label, message):
    with pytest.raises(ValueError, match=message):
        flag_collapsed(
            torch.ones(4, 3), tolerance=0, num_contrast=2, same_label=same_label, support_floor=support_floor
        )
    if same_label is not None:
        with pytest.raises(ValueError, match=message):
            DeltaInfluence(support_floor=support_floor)


def test_samples_that_were_not_scored_are_never_flagged_and_the_others_decide_as_before():
    scores = torch.tensor([[5.0, 5.0, 5.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [1.0, 6.0, 1.0], [0.0, 4.0, 0.0]])
    same = torch.tensor([True, True, False])
    every = flag_collapsed(scores, tolerance=0, num_contrast=2, same_label=same, support_floor=0.05)
    unscored = scores.clone()
    unscored[:, 2] = float("nan")  # sample 2, of another label, was not scored
    some = flag_collapsed(unscored, 0.0, 0, 2, 2.0, same, support_floor=0.05, scored=same)
    assert torch.equal(some.flagged, every.flagged) and some.flagged.tolist() == [0]
    assert some.collapsed.tolist() == [0, 1] and some.counts[2] == 0  # collapse among the scored samples only
    nan_in_scored = unscored.clone()
    nan_in_scored[0, 0] = float("nan")
    with pytest.raises(ValueError, match="scores holds 1 NaN or infinite values"):
        flag_collapsed(nan_in_scored, 0.0, 0, 2, 2.0, same, scored=same)


@pytest.mark.parametrize(
    "scored, message",
    [
        (torch.tensor([True, False, False]), r"1 samples of the attacker's label were not scored"),
        (torch.tensor([1, 1, 0]), r"scored has dtype torch.int64 and shape \(3,\); expected bool \[3\]"),
        (torch.tensor([True, True]), r"scored has dtype torch.bool and shape \(2,\); expected bool \[3\]"),
    ],
)
def test_scored_samples_must_fit_the_training_set_and_cover_the_label(scored, message):
    scores = torch.ones(5, 3)
    with pytest.raises(ValueError, match=message):
        flag_collapsed(scores, 0.0, 0, 2, 2.0, torch.tensor([True, True, False]), scored=scored)
