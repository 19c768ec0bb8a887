import copy
import gc
import importlib
import io
import pkgutil

import kronfluence
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset
from tqdm import tqdm

import delta_influence.influence as influence
from delta_influence.influence import (
    ClassificationTask,
    InfluenceAnalysis,
    compute_influence_scores,
    label_margins,
    sampled_labels,
)
from delta_influence.quiet import KRONFLUENCE_BARS, transient_bars


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    )


def _data():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(24, 1, 8, 8, generator=generator)
    labels = torch.randint(3, (24,), generator=generator)
    return TensorDataset(images, labels)


def test_margin_is_own_logit_minus_logsumexp_of_the_others():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    expected = 2.0 - torch.logsumexp(torch.tensor([1.0, 3.0]), 0)
    assert torch.allclose(label_margins(logits, torch.tensor([1])), expected[None])


def test_sign_training_on_the_query_itself_scores_positive(tmp_path):
    train = _data()
    image, label = train[5]
    queries = TensorDataset(torch.stack([image, image]), torch.tensor([int(label), (int(label) + 1) % 3]))
    scores = compute_influence_scores(_model(), train, queries, tmp_path, train_batch_size=8).scores
    assert scores.shape == (2, 24)
    assert scores[0, 5] > 0  # same image, same label: training on it raises the label's margin
    assert scores[1, 5] < 0  # same image, another label: it lowers that label's margin
    assert scores[0, 5] == scores[0].max()


def test_one_pass_equals_one_pass_per_query_and_leaves_the_model_alone(tmp_path):
    model, train = _model(), _data()
    before = copy.deepcopy(model.state_dict())
    queries = TensorDataset(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    together = compute_influence_scores(model, train, queries, tmp_path, train_batch_size=8)
    for k in range(4):
        alone = compute_influence_scores(model, train, Subset(queries, [k]), tmp_path, train_batch_size=8)
        assert torch.allclose(alone.scores[0], together.scores[k], rtol=1e-4, atol=1e-4)
        assert alone.factors_reused
    assert not together.factors_reused
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model[0], nn.Conv2d)  # not rewrapped by kronfluence


def test_scoring_some_samples_gives_their_scores_and_nan_for_the_others(tmp_path):
    model, train = _model(), _data()
    queries = TensorDataset(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
    every = compute_influence_scores(model, train, queries, tmp_path, train_batch_size=8)
    chosen = torch.tensor([1, 4, 5, 20])
    some = compute_influence_scores(model, train, queries, tmp_path, train_batch_size=8, scored=chosen)
    assert some.factors_reused and some.factors_name == every.factors_name  # the whole training set's factors
    assert torch.allclose(some.scores[:, chosen], every.scores[:, chosen], rtol=1e-4, atol=1e-4)
    others = torch.ones(24, dtype=torch.bool).index_fill_(0, chosen, False)
    assert some.scores.shape == (3, 24) and some.scores[:, others].isnan().all()


@pytest.mark.parametrize(
    "scored, message",
    [
        (torch.tensor([3, 1]), r"sorted, distinct indices in 0..23"),
        (torch.tensor([1, 1]), r"sorted, distinct indices in 0..23"),
        (torch.tensor([0, 24]), r"sorted, distinct indices in 0..23"),
        (torch.tensor([0.0, 1.0]), r"scored has dtype torch.float32 and shape \(2,\); expected a non-empty int64"),
        (torch.tensor([], dtype=torch.long), r"expected a non-empty int64 vector"),
    ],
)
def test_bad_samples_to_score_are_refused(tmp_path, scored, message):
    queries = TensorDataset(torch.randn(1, 1, 8, 8), torch.tensor([0]))
    with pytest.raises(ValueError, match=message):
        compute_influence_scores(_model(), _data(), queries, tmp_path, scored=scored)


def test_kronfluences_collections_skip_the_objects_the_process_had_before_a_pass(tmp_path, monkeypatch):
    seen, collect = [], gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: seen.append(gc.get_freeze_count()) or collect(*args))
    queries = TensorDataset(torch.randn(1, 1, 8, 8), torch.tensor([0]))
    compute_influence_scores(_model(), _data(), queries, tmp_path, train_batch_size=8)  # factors, then scores
    assert seen and min(seen) > 0  # every collection inside the passes walked only what the passes made
    assert gc.get_freeze_count() == 0  # and the process's objects are the collector's again
    gc.freeze()  # someone else's freeze is left as it was
    try:
        compute_influence_scores(_model(), _data(), queries, tmp_path, train_batch_size=8)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_factors_are_keyed_by_the_weights(tmp_path):
    model, train = _model(), _data()
    queries = TensorDataset(torch.randn(1, 1, 8, 8), torch.tensor([0]))
    first = compute_influence_scores(model, train, queries, tmp_path, train_batch_size=8)
    with torch.no_grad():
        model[-1].bias.add_(1.0)
    second = compute_influence_scores(model, train, queries, tmp_path, train_batch_size=8)
    assert first.factors_name != second.factors_name and not second.factors_reused
    assert not any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))


def test_the_factor_key_covers_everything_that_makes_the_factors(tmp_path, monkeypatch):
    """Each change gets factors of its own name, which ``fit_factors`` finds absent and fits afresh (the refit itself:
    ``test_factors_are_keyed_by_the_weights``); the same weights, data and settings get the same name."""
    model, train = _model(), _data()

    def name(data=train, **settings) -> str:
        return InfluenceAnalysis(model, data, tmp_path, **{"train_batch_size": 8, **settings}).factors_name

    first = name()
    images, labels = train.tensors
    one_input = images.clone()
    one_input[20, 0, 3, 3] += 0.5  # far from the start
    one_label = labels.clone()
    one_label[17] = (one_label[17] + 1) % 3
    changes = {
        "one input": name(TensorDataset(one_input, labels)),
        "one label": name(TensorDataset(images, one_label)),
        "the order": name(TensorDataset(images.flip(0), labels.flip(0))),
        "the strategy": name(strategy="kfac"),
        "the Fisher-sampling seed": name(seed=1),
        "a sample for the factor fits": name(factor_examples=12),
    }

    class OtherTask(influence.ClassificationTask):
        """Another training loss or measurement."""

    monkeypatch.setattr(influence, "ClassificationTask", OtherTask)
    changes["the task"] = name()
    monkeypatch.undo()
    assert [change for change, other in changes.items() if other == first] == []
    assert name(_data()) == first
    assert name(train_batch_size=16) == first  # each sample's Fisher draw is its own, whatever the batch


def test_factors_fitted_on_a_sample_score_every_sample_and_time_each_stage(tmp_path):
    model, train = _model(), _data()
    queries = TensorDataset(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    analysis = InfluenceAnalysis(model, train, tmp_path, train_batch_size=8, factor_examples=12, seed=3)
    assert len(analysis.factor_set) == 12 and sorted(analysis.factor_set.indices) == analysis.factor_set.indices
    again = InfluenceAnalysis(model, train, tmp_path, train_batch_size=8, factor_examples=12, seed=3)
    assert again.factor_set.indices == analysis.factor_set.indices  # seeded
    assert InfluenceAnalysis(model, train, tmp_path, factor_examples=100).factor_set is train  # more than there are
    sampled = compute_influence_scores(model, train, queries, tmp_path, train_batch_size=8, factor_examples=12)
    assert sampled.scores.shape == (2, 24) and torch.isfinite(sampled.scores).all()
    assert {"covariance_s", "eigendecomposition_s", "lambda_s"} <= set(sampled.timings)
    assert (
        sum(sampled.timings[k] for k in ("covariance_s", "eigendecomposition_s", "lambda_s"))
        <= sampled.timings["factors_s"]
    )
    with pytest.raises(ValueError, match="factor_examples=0 must be at least 1"):
        InfluenceAnalysis(model, train, tmp_path, factor_examples=0)


def test_factors_are_seeded(tmp_path):
    """The true Fisher samples labels; the fit is seeded, so two processes (or folders) get the same factors."""
    model, train = _model(), _data()
    queries = TensorDataset(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    fit = {"train_batch_size": 8, "strategy": "diagonal"}  # the cheapest fit that samples labels
    torch.manual_seed(123)
    first = compute_influence_scores(model, train, queries, tmp_path / "a", **fit)
    torch.manual_seed(7)  # another random state: the same factors, the same scores
    second = compute_influence_scores(model, train, queries, tmp_path / "b", **fit)
    assert torch.equal(first.scores, second.scores)
    other_seed = compute_influence_scores(model, train, queries, tmp_path / "c", **fit, seed=1)
    assert not torch.equal(first.scores, other_seed.scores)  # the seed is what made them equal
    batched = compute_influence_scores(model, train, queries, tmp_path / "d", **{**fit, "train_batch_size": 5})
    assert torch.allclose(first.scores, batched.scores, rtol=1e-4, atol=1e-6)  # other batches: the same draws


def test_model_without_trackable_layers_is_refused(tmp_path):
    class Untrackable(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 3))

        def forward(self, x):
            return x.flatten(1) @ self.weight

    with pytest.raises(TypeError, match="no nn.Linear or nn.Conv2d layer"):
        compute_influence_scores(Untrackable(), _data(), _data(), tmp_path)


def test_unknown_strategy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="strategy='fancy' is not known"):
        compute_influence_scores(_model(), _data(), _data(), tmp_path, strategy="fancy")


def test_true_fisher_draws_labels_from_the_models_predictions():
    """With ``sample=True`` (how kronfluence fits the true Fisher) the given labels play no part: the loss uses
    labels drawn from the model's own predictive distribution."""
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 0.0, 30.0]))  # the model is sure of class 2
    inputs, given = torch.randn(16, 2), torch.zeros(16, dtype=torch.long)
    task, indices = ClassificationTask(), torch.arange(16)
    sampled = task.compute_train_loss((inputs, given, indices), model, sample=True)
    expected = F.cross_entropy(model(inputs), torch.full((16,), 2), reduction="sum")
    assert torch.allclose(sampled, expected)
    assert task.compute_train_loss((inputs, given), model, sample=False) > 100 * sampled  # the empirical Fisher's
    draws = sampled_labels(torch.zeros(4000, 3), torch.arange(4000), seed=0)  # a uniform model: every label
    assert torch.equal(draws, sampled_labels(torch.zeros(4000, 3), torch.arange(4000), seed=0))
    assert (draws.bincount(minlength=3) - 4000 / 3).abs().max() < 150


def test_kronfluences_progress_bars_erase_themselves_inside_the_block_only():
    def drawn(module) -> str:
        out = io.StringIO()
        for _ in module.tqdm(range(3), file=out):
            pass
        return out.getvalue()

    modules = [importlib.import_module(name) for name in KRONFLUENCE_BARS]
    with transient_bars():
        assert [drawn(module).endswith("\n") for module in modules] == [False] * len(modules)  # nothing left behind
    assert [drawn(module).endswith("\n") for module in modules] == [True] * len(modules)  # kronfluence's own again


def test_every_kronfluence_module_that_draws_bars_is_made_transient():
    drawing = {
        module.name
        for module in pkgutil.walk_packages(kronfluence.__path__, "kronfluence.")
        if getattr(importlib.import_module(module.name), "tqdm", None) is tqdm
    }
    assert drawing == set(KRONFLUENCE_BARS)
