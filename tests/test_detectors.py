"""The detector interface, the baselines on data where the answer is known, and the callback running any of them."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_trainer
from torch import nn
from torch.utils.data import TensorDataset

from delta_influence.callbacks import InfluenceCollapseCallback
from delta_influence.detectors import (
    AGPD,
    ASSET,
    ActivationClustering,
    CognitiveDistillation,
    DeltaInfluence,
    DetectionInput,
    FrequencyAnalysis,
    InfluenceThreshold,
    Oracle,
    RandomSubset,
    SCAn,
    SpectralSignatures,
)
from delta_influence.detectors.baselines import corrupt, dct2
from delta_influence.detectors.gradients import quietest_window, target_labels
from delta_influence.errors import ConfigError, UnsupportedModelError
from delta_influence.examples import evaluating, first_attacked, select_contrast
from delta_influence.models import penultimate_activations


def _planted(outliers: int = 15) -> tuple[DetectionInput, torch.Tensor]:
    """Features that the model passes straight to its linear head: label 0 holds ``outliers`` samples far out along
    one direction (the planted poisons), label 1 two equal groups (a clean label with two modes)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=generator)
    features[:outliers, 0] += 8.0
    features[150:, 1] += 8.0
    labels = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    model = nn.Sequential(nn.Identity(), nn.Linear(8, 2))
    return DetectionInput(model, TensorDataset(features, labels), num_classes=2), torch.arange(outliers)


def test_penultimate_activations_need_a_linear_head():
    data = TensorDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2))
    with pytest.raises(UnsupportedModelError, match="no nn.Linear layer"):
        penultimate_activations(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), data)


def test_activation_clustering_flags_the_small_cluster_only():
    inputs, planted = _planted()
    detection = ActivationClustering().detect(inputs)
    assert detection.flagged.tolist() == planted.tolist()  # label 1 splits in halves: neither is small enough
    assert detection.detector == "activation_clustering"


def test_spectral_signatures_flag_the_outliers_of_each_label():
    inputs, planted = _planted(outliers=5)
    detection = SpectralSignatures(expected_fraction=0.05).detect(inputs)
    assert len(detection.flagged) == 2 * 7  # 1.5 x 5 % of each label's 100 samples
    assert set(planted.tolist()) <= set(detection.flagged.tolist())
    assert detection.scores[planted].min() > detection.scores[5:100].max()


def test_oracle_and_random_bounds():
    inputs, planted = _planted()
    inputs.poison_indices = planted
    assert Oracle().detect(inputs).flagged.tolist() == planted.tolist()
    random = RandomSubset(seed=3).detect(inputs).flagged
    assert len(random) == 15 and torch.equal(random, RandomSubset(seed=3).detect(inputs).flagged)
    inputs.poison_indices = None
    with pytest.raises(ConfigError, match="the oracle detector needs the true poison indices"):
        Oracle().detect(inputs)


def test_dct_is_orthonormal_and_corruptions_stay_images():
    images = torch.rand(6, 3, 16, 16)
    assert torch.allclose((dct2(images) ** 2).sum(), (images**2).sum(), rtol=1e-4)
    corrupted = corrupt(images, torch.Generator().manual_seed(0))
    assert corrupted.shape == images.shape and 0 <= corrupted.min() and corrupted.max() <= 1
    assert not torch.equal(corrupted, images)


def test_frequency_analysis_learns_corruptions_and_is_cached(tmp_path):
    generator = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(600, 1, 4, 4, generator=generator), size=16, mode="bilinear")
    clean = TensorDataset(smooth[:400], torch.zeros(400).long())
    patched = smooth[400:].clone()
    patched[:100, :, 12:15, 12:15] = 1.0  # a BadNets-like patch on half of the training images
    train = TensorDataset(patched, torch.zeros(200).long())
    inputs = DetectionInput(nn.Linear(1, 1), train, 2, factors_dir=tmp_path / "factors", clean_set=clean,
                            mean=[0.0], std=[1.0])  # fmt: skip
    detector = FrequencyAnalysis(epochs=8, batch_size=64)
    first = detector.detect(inputs)
    assert first.scores[:100].mean() > first.scores[100:].mean() + 0.3  # patched images look poisoned
    assert first.info["val_acc"] > 0.7
    again = detector.detect(inputs)  # the classifier comes from the cache, not a second training
    assert again.info["train_s"] == first.info["train_s"] and torch.equal(again.scores, first.scores)
    assert list((tmp_path / "detector_cache").glob("frequency_cnn-*.pt"))


def test_influence_detectors_share_factors(trained_digits, tmp_path):
    data, model = trained_digits
    image, label = data.attack_test_set[first_attacked(model, data.attack_test_set)]
    contrast = torch.stack([data.test_set[i][0] for i in select_contrast(model, data.test_set, int(label), 5)])
    inputs = DetectionInput(model, data.eval_train_set, 10, tmp_path, query=(image, int(label)), contrast=contrast,
                            poison_indices=data.poison_indices)  # fmt: skip
    delta = DeltaInfluence(num_transforms=4, tolerance=1, strategy="diagonal").detect(inputs)
    top = InfluenceThreshold(top_k=20, strategy="diagonal").detect(inputs)
    assert top.evidence.factors_reused and top.evidence.factors_name == delta.evidence.factors_name
    scored = data.eval_train_set.labels == int(label)  # Δ-Influence scores only the samples its rule can flag
    assert torch.equal(delta.scores.isfinite(), scored) and len(top.flagged) == 20
    assert torch.allclose(top.scores[scored], delta.scores[scored], rtol=1e-3, atol=1e-3)
    above = InfluenceThreshold(threshold=float(top.scores.median()), strategy="diagonal").detect(inputs)
    assert len(above.flagged) == (top.scores > top.scores.median()).sum()
    with pytest.raises(ConfigError, match="needs the misbehaving query"):
        InfluenceThreshold().detect(DetectionInput(model, data.eval_train_set, 10, tmp_path))


def test_callback_runs_another_detector_and_corrects_on_its_answer(trained_digits, tmp_path):
    import copy

    from delta_influence.lightning_modules.unlearning import Retrain

    data, model = trained_digits
    callback = InfluenceCollapseCallback(
        detector=SpectralSignatures(expected_fraction=0.05), unlearning=Retrain(max_epochs=1)
    )
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[callback], enable_checkpointing=False)
    trainer.fit(copy.deepcopy(model), datamodule=data)
    out = callback.result.output_dir
    assert out.name == "spectral_signatures" and callback.result.evidence is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["detector"] == "spectral_signatures" and summary["expected_fraction"] == 0.05
    flagged = json.loads((out / "flagged.json").read_text())["flagged"]
    (first,) = callback.correction.rounds  # a detector that traces no query: one round
    assert flagged == callback.result.flagged.tolist() and first.corrected.report.forgotten == len(flagged)
    assert first.corrected.report.flagged_by == "spectral_signatures"
    assert set(callback.correction.final.forgotten.tolist()) <= set(flagged)  # after the second opinion
    assert callback.correction.stopped.startswith("spectral_signatures traces no query")
    assert 0 < summary["metrics"]["recall"] and summary["metrics"]["flagged"] == len(flagged)


def test_a_query_label_no_training_sample_carries_is_refused(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 24 * 24, 3))
    train = TensorDataset(torch.randn(6, 3, 24, 24), torch.tensor([0, 1] * 3))
    query, contrast = (torch.randn(3, 24, 24), 2), torch.randn(2, 3, 24, 24)  # label 2: no training sample has it
    inputs = DetectionInput(model, train, 3, tmp_path, query=query, contrast=contrast)
    with pytest.raises(ConfigError, match="no training sample carries the query's label 2, and with same_label=True"):
        DeltaInfluence(num_transforms=4, tolerance=1).detect(inputs)


def _labelled_clusters(planted: int = 12, dims: int = 8, seed: int = 0):
    """Features passed straight to a linear head: six labels of 40 samples around their own means, label 0 with
    ``planted`` more samples around a distant point (the poisons, last in the training set); a clean held-out set of
    20 per label. Returns (inputs, planted indices)."""
    generator = torch.Generator().manual_seed(seed)
    means = 4 * torch.randn(6, dims, generator=generator)
    labels = torch.arange(6).repeat_interleave(40)
    features = means[labels] + torch.randn(len(labels), dims, generator=generator)
    poisons = means[0] + 10 * torch.nn.functional.normalize(torch.ones(dims), dim=0)
    features = torch.cat([features, poisons + torch.randn(planted, dims, generator=generator)])
    labels = torch.cat([labels, torch.zeros(planted, dtype=torch.long)])
    clean_labels = torch.arange(6).repeat_interleave(20)
    clean = TensorDataset(means[clean_labels] + torch.randn(len(clean_labels), dims, generator=generator), clean_labels)
    model = nn.Sequential(nn.Identity(), nn.Linear(dims, 6))
    inputs = DetectionInput(model, TensorDataset(features, labels), num_classes=6, clean_set=clean)
    return inputs, torch.arange(240, 240 + planted)


def test_scan_flags_the_second_population_of_the_contaminated_label_only():
    inputs, planted = _labelled_clusters()
    detection = SCAn(clean_images=120).detect(inputs)
    assert detection.flagged.tolist() == planted.tolist()
    assert (
        detection.info["anomaly_index_0"]
        > SCAn().cutoff
        > max(detection.info[f"anomaly_index_{k}"] for k in range(1, 6))
    )
    inputs.clean_set = None
    with pytest.raises(ConfigError, match=r"the scan detector needs 2000 clean held-out images \(clean_set"):
        SCAn().detect(inputs)
    inputs.clean_set = TensorDataset(torch.zeros(12, 8), torch.arange(6).repeat(2))
    with pytest.raises(
        ConfigError, match=r"draws 333 clean images of each label .* which has 2 of label 0; give it fewer"
    ):
        SCAn().detect(inputs)


def test_agpd_takes_each_samples_own_logit_gradient_and_filters_the_planted_directions(trained_digits):
    data, model = trained_digits
    agpd = AGPD(batch_size=7)  # batches do not mix samples: any batch size gives each sample's own gradient
    subset = torch.utils.data.Subset(data.eval_train_set, list(range(10)))
    gradients = agpd.activation_gradients(model, subset, "cpu")
    image, label = data.eval_train_set[3]
    first = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    captured = []
    hook = first.register_forward_hook(lambda module, args, output: captured.append(output))
    with evaluating(model):  # the shared model goes back to its mode: Lightning keeps a module's mode when it fits
        own = model(image[None])[0, int(label)]
    hook.remove()
    (expected,) = torch.autograd.grad(own, captured[0])
    assert torch.allclose(gradients[0][3], expected.mean(dim=(2, 3))[0], atol=1e-6)
    # within a target label: 30 gradients along a direction of their own, 300 around the clean mean
    generator = torch.Generator().manual_seed(0)
    reference = torch.ones(16)
    clean = reference + 0.3 * torch.randn(300, 16, generator=generator)
    planted = torch.cat([-torch.ones(8), torch.ones(8)]) + 0.3 * torch.randn(30, 16, generator=generator)
    group, joined = agpd.filter(torch.cat([planted, clean]), reference)
    assert joined[:30].max() < joined[30:].min()  # every planted gradient joins the anchor's group before a clean one
    assert set(range(30)) <= set(group.tolist())
    # the group stops growing where the histograms' change is smallest and steadiest: here from the fourth round on
    change = torch.tensor([0.5, 0.4, 0.45, 0.05, 0.04, 0.05, 0.3, 0.6])
    assert quietest_window(change, 3) == 3 and quietest_window(change, 10) == 0
    dispersion = torch.full((2, 10), 0.2) + 0.01 * torch.randn(2, 10, generator=generator)
    dispersion[1, 5] = 0.6  # one label far more dispersed than the others, in the second layer
    assert target_labels(dispersion, list(range(10))) == (1, [5])


def test_asset_gives_the_samples_unlike_the_clean_base_set_the_highest_loss():
    inputs, planted = _labelled_clusters(planted=20)
    features, labels = inputs.train_set.tensors
    features[planted] += 20 * torch.nn.functional.normalize(torch.ones(8), dim=0)  # far from every clean image
    detection = ASSET(steps=40, inner_steps=50, lr=1e-3, batch_size=64, clean_images=120).detect(inputs)
    clean = torch.ones(len(detection.scores), dtype=torch.bool)
    clean[planted] = False
    assert detection.info["selected"] > 0  # the separating network found outliers to push away
    # the offset model is unsure on clean data (cross-entropy near ln 6 = 1.8 ...) and wrong on the planted samples
    assert detection.scores[planted].mean() > detection.scores[clean].mean() + 2


def test_cognitive_distillation_needs_fewer_pixels_of_a_triggered_image(trained_digits):
    data, model = trained_digits
    fives = [i for i in range(len(data.eval_train_set)) if int(data.eval_train_set[i][1]) == 5]
    poisons = set(data.poison_indices.tolist())
    chosen = [i for i in fives if i in poisons][:8] + [i for i in fives if i not in poisons][:8]
    subset = torch.utils.data.Subset(data.eval_train_set, chosen)
    norms = CognitiveDistillation(batch_size=16).mask_norms(model, subset, data.mean, data.std, "cpu")
    # the trigger's pixels suffice for a poison; a clean five needs more of its strokes (means 110 and 134)
    assert norms[:8].mean() < norms[8:].mean() - 15
    inputs = DetectionInput(model, subset, 10, clean_set=data.test_set)
    with pytest.raises(ConfigError, match="the cognitive_distillation detector needs the normalisation's mean"):
        CognitiveDistillation().detect(inputs)


@pytest.mark.parametrize(
    "name, setting, value",
    [("CognitiveDistillation", "steps", 5), ("SCAn", "clean_images", 100), ("ASSET", "steps", 3), ("AGPD", "tau", 0.1)],
)
def test_the_command_line_picks_each_detector_of_the_field(tmp_path, name, setting, value):
    from delta_influence.cli import train

    config = str(Path(__file__).resolve().parents[1] / "configs" / "digits_badnets.yaml")
    cli = train.main(["--config", config, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
                      "--detector", name, f"--detector.{setting}", str(value)], run=False)  # fmt: skip
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCollapseCallback)]
    assert type(callback.detector).__name__ == name and getattr(callback.detector, setting) == value


def test_the_audit_runs_scan_on_clean_test_images_and_corrects_on_its_answer(trained_digits, tmp_path):
    import copy

    from delta_influence.lightning_modules.unlearning import Retrain

    data, model = trained_digits
    callback = InfluenceCollapseCallback(detector=SCAn(clean_images=100), unlearning=Retrain(max_epochs=1))
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[callback], enable_checkpointing=False)
    trainer.fit(copy.deepcopy(model), datamodule=data)
    summary = json.loads((callback.result.output_dir / "summary.json").read_text())
    assert summary["detector"] == "scan" and summary["clean_images"] == 100
    assert summary["metrics"]["total_s"] > 0 and "anomaly_index_5" in summary["metrics"]
