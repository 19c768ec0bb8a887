"""InfluenceCollapseCallback on the project's own data module and classifier."""

import copy
import dataclasses
import json
import logging
import random
import re

import pytest
import torch
import torchvision
from conftest import tiny_trainer
from torch import nn
from torch.utils.data import DataLoader

import delta_influence.detectors.delta_influence as delta_influence_detector
from delta_influence import AuditError, DeltaInfluence, flag_collapsed
from delta_influence.audit import eval_train_set_of
from delta_influence.callbacks import InfluenceCollapseCallback
from delta_influence.datamodules import ImageDataset
from delta_influence.errors import ConfigError
from delta_influence.examples import ContrastError

DETECTOR_SETTINGS = {field.name for field in dataclasses.fields(DeltaInfluence)}


def _callback(**kwargs) -> InfluenceCollapseCallback:
    """The callback with Δ-Influence: the detector's settings go to it, the rest to the callback."""
    settings = {key: kwargs.pop(key) for key in list(kwargs) if key in DETECTOR_SETTINGS}
    return InfluenceCollapseCallback(DeltaInfluence(**settings), **kwargs)


def _fit_with(tmp_path, trained_digits, callback, **trainer_kwargs):
    """One more epoch of the shared victim (a copy) with ``callback`` attached; returns the trainer."""
    data, model = trained_digits
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[callback], **trainer_kwargs)
    trainer.fit(copy.deepcopy(model), datamodule=data)
    return trainer


def _audit(tmp_path, trained_digits, shared_factors, **kwargs):
    """The callback's audit of the shared victim itself (no further training), with the session's factors."""
    data, model = trained_digits
    callback = _callback(factors_dir=str(shared_factors), output_dir=str(tmp_path / "audit"), **kwargs)
    callback.result = callback.audit(tiny_trainer(tmp_path), model, data)
    return callback


def test_audit_writes_its_files_and_a_rerun_reuses_the_factors(tmp_path, trained_digits, caplog):
    caplog.set_level(logging.INFO)
    callback = _callback(num_transforms=12, tolerance=1, output_dir=str(tmp_path / "audit"))
    trainer = _fit_with(tmp_path, trained_digits, callback, enable_checkpointing=False)
    first = callback.result
    files = {p.name for p in first.output_dir.iterdir()}
    assert files >= {"flagged.json", "flagged.pt", "scores.pt", "counts.pt", "queries.pt", "summary.json"}
    assert files >= {"queries.png", "collapse_counts.png"}
    summary = json.loads((first.output_dir / "summary.json").read_text())
    assert summary["factors_reused"] is False and summary["num_transforms"] == 12
    metrics = summary["metrics"]  # every stage's cost also in epochs of this run (one epoch here: 13 steps)
    assert metrics["covariance_epochs"] / metrics["covariance_s"] == pytest.approx(1 / callback._epoch_seconds[0])
    assert metrics["total_epochs"] >= metrics["factors_epochs"] + metrics["scores_epochs"] - 1e-9
    assert json.loads((first.output_dir / "flagged.json").read_text())["flagged"] == first.flagged.tolist()
    scores = torch.load(first.output_dir / "scores.pt")  # query, copies, contrast; NaN: a sample of another label
    assert scores.shape == (1 + 12 + callback.detector.num_contrast, 400) and torch.allclose(
        scores, first.evidence.scores, equal_nan=True
    )
    fives = trained_digits[0].eval_train_set.labels == 5  # the only samples the default rule can flag are scored
    assert scores[:, fives].isfinite().all() and scores[:, ~fives].isnan().all()
    assert summary["score_rows"] == {
        "original": 0,
        "transformed": [1, 12],
        "contrast": [13, 12 + callback.detector.num_contrast],
    }
    assert len(summary["contrast"]) == callback.detector.num_contrast
    assert summary["metrics"]["collapsed"] >= len(first.flagged)
    assert {"contrast.pt", "contrast.png"} <= files
    poisons = trained_digits[0].poison_indices
    assert torch.isin(poisons, first.flagged).all() and first.metrics["recall"] == 1.0  # every poison found
    verified = json.loads((first.output_dir / "verification.json").read_text())  # the verification stage's evidence
    assert "verification.png" in files and verified["rule_flagged"] == first.evidence.decision.flagged.tolist()
    assert metrics["rule_flagged"] == len(verified["rule_flagged"]) and metrics["verify_s"] > 0
    # the console's line says what the files hold, in numbers that add up: kept + recovered = flagged
    (line,) = [record.getMessage() for record in caplog.records if "Δ-Influence flagged" in record.getMessage()]
    found = re.search(
        r"flagged (\d+) samples .* prune kept (\d+) of the rule's (\d+) and its recovery added (\d+) \((\d+) of them "
        r"pruned before\)",
        line,
    )
    assert found, line
    rule, recovered = set(verified["rule_flagged"]), set(verified["recovered"])
    assert [int(number) for number in found.groups()] == [
        len(first.flagged),
        len(verified["kept"]),
        len(rule),
        len(recovered),
        len(recovered & rule),
    ]
    assert len(verified["kept"]) + len(recovered) == len(first.flagged)
    assert summary["verified"]["groups_tested"] == len(verified["groups"])
    evidence = torch.load(first.output_dir / "contrast.pt")  # the support floor: a share of the label's median C
    label_contrast, floor = evidence["contrast"][evidence["same_label"]], summary["floor"]  # (of those above it)
    assert summary["support_floor"] == 0.045
    assert floor == pytest.approx(0.045 * label_contrast[label_contrast >= floor].median().item())
    assert summary["unsupportive"] == len(evidence["unsupportive"])
    assert torch.isin(evidence["unsupportive"], torch.tensor(verified["rule_flagged"], dtype=torch.long)).all()

    # the same weights audited again, by another callback and by the same one: factors reused, the first audit left
    rerun = _callback(num_transforms=12, tolerance=1, output_dir=str(tmp_path / "audit"))
    second = rerun.audit(trainer, trainer.lightning_module)
    third = callback.audit(trainer, trainer.lightning_module)
    assert json.loads((third.output_dir / "summary.json").read_text())["factors_reused"] is True
    assert torch.equal(second.flagged, first.flagged)
    assert torch.allclose(third.evidence.scores, first.evidence.scores, equal_nan=True)
    assert (first.output_dir.name, second.output_dir.name, third.output_dir.name) == ("audit", "audit-2", "audit-3")
    assert json.loads((first.output_dir / "summary.json").read_text()) == summary
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".audit")]  # no staging folder left


def test_verification_is_switchable_and_off_leaves_the_rules_answer(tmp_path, trained_digits, shared_factors):
    settings = {"num_transforms": 4, "tolerance": 1, "strategy": "diagonal"}
    on = _audit(tmp_path, trained_digits, shared_factors, **settings).result
    off = _audit(tmp_path, trained_digits, shared_factors, **settings, verification=None).result
    assert off.evidence.verification is None and "verify_s" not in off.metrics
    assert torch.equal(off.flagged, on.evidence.decision.flagged)  # the rule's answer, bit for bit
    assert torch.equal(on.flagged, on.evidence.verification.flagged)
    with pytest.raises(ConfigError, match=r"num_contrast=0 \(the paper's rule\) leaves the verification stage"):
        DeltaInfluence(num_contrast=0)  # the stage measures the query against the contrast: it must be turned off


def test_the_adaptive_ratio_reaches_the_rule_and_the_summary(tmp_path, trained_digits, shared_factors):
    settings = {"num_transforms": 4, "tolerance": 1, "strategy": "diagonal", "verification": None}
    fixed = _audit(tmp_path, trained_digits, shared_factors, **settings).result
    adaptive = _audit(tmp_path, trained_digits, shared_factors, **settings, adaptive_ratio=True).result
    decision = adaptive.evidence.decision
    assert decision.split is not None and decision.contrast_ratio == max(2.0, decision.split)
    assert adaptive.summary["split"] == decision.split and "split" not in fixed.summary
    assert adaptive.summary["contrast_ratio_applied"] == decision.contrast_ratio
    rule = fixed.evidence.decision  # the same scores, decided with the applied ratio as a fixed one
    again = flag_collapsed(adaptive.evidence.scores, 0.0, 1, len(adaptive.summary["contrast"]), decision.contrast_ratio,
                           rule.same_label, rule.support_floor, rule.scored)  # fmt: skip
    assert torch.equal(adaptive.flagged, again.flagged)
    with pytest.raises(ConfigError, match="adaptive_ratio splits the contrast ratios of the query's label"):
        DeltaInfluence(adaptive_ratio=True, same_label=False)


def test_audits_with_another_fisher_seed_fit_their_own_factors_in_a_shared_folder(
    tmp_path, trained_digits, shared_factors
):
    settings = {"num_transforms": 4, "tolerance": 1, "strategy": "diagonal"}  # the cheapest fit: the key is the point
    first = _audit(tmp_path, trained_digits, shared_factors, **settings).result
    other = _audit(tmp_path, trained_digits, shared_factors, **settings, seed=1).result
    again = _audit(tmp_path, trained_digits, shared_factors, **settings).result
    assert not other.summary["factors_reused"] and again.summary["factors_reused"]
    assert other.summary["factors"] != first.summary["factors"] == again.summary["factors"]
    assert {first.summary["factors"], other.summary["factors"]} <= {p.name.removeprefix("factors_") for p in
                                                                    shared_factors.rglob("factors_*")}  # fmt: skip


def test_non_finite_scores_stop_the_audit_and_write_nothing(tmp_path, trained_digits, monkeypatch, shared_factors):
    real = delta_influence_detector.compute_influence_scores

    def nan_scores(*args, **kwargs):
        result = real(*args, **kwargs)
        result.scores[0, int(result.scores[0].isfinite().nonzero()[0])] = float("nan")  # a sample that was scored
        return result

    monkeypatch.setattr(delta_influence_detector, "compute_influence_scores", nan_scores)
    with pytest.raises(ValueError, match="NaN or infinite"):
        _audit(tmp_path, trained_digits, shared_factors, num_transforms=4, tolerance=1)
    assert not (tmp_path / "audit").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".audit")]


def test_query_the_model_does_not_misclassify(tmp_path, trained_digits, shared_factors):
    data, _ = trained_digits
    eight = int(torch.nonzero(data.test_set.labels == 8)[0])  # a clean eight, which the model calls 8, labelled 5
    path = tmp_path / "eight.png"
    torchvision.io.write_png(data.test_set.images[eight], str(path))
    with pytest.raises(AuditError, match=r"predicts class 8 .* not the attack's label 5.*require_misclassified=false"):
        _audit(tmp_path, trained_digits, shared_factors, query_image=str(path), query_label=5, num_transforms=4,
               tolerance=1)  # fmt: skip
    anyway = _audit(
        tmp_path, trained_digits, shared_factors, query_image=str(path), query_label=5, require_misclassified=False,
        num_transforms=4, tolerance=1,
    )  # fmt: skip
    assert anyway.result.evidence.scores.shape == (1 + 4 + anyway.detector.num_contrast, 400)


def test_out_of_range_query_index(tmp_path, trained_digits):
    callback = InfluenceCollapseCallback(query_index=44)
    with pytest.raises(AuditError, match=r"query_index=44 is out of range.*44 samples, so use 0..43"):
        _fit_with(tmp_path, trained_digits, callback)


def test_query_image_file(tmp_path, trained_digits, shared_factors):
    data, _ = trained_digits
    image, _ = data.attack_test_set[0]
    pixels = (image * data.std.view(-1, 1, 1) + data.mean.view(-1, 1, 1)).clamp(0, 1)
    path = tmp_path / "query.png"
    torchvision.io.write_png((pixels * 255).round().to(torch.uint8), str(path))
    callback = _audit(
        tmp_path, trained_digits, shared_factors, query_image=str(path), query_label=5, require_misclassified=False,
        num_transforms=4, tolerance=1,
    )  # fmt: skip
    queries = torch.load(callback.result.output_dir / "queries.pt")
    assert torch.allclose(queries["images"][0], image, atol=1e-5) and queries["labels"][0] == 5


def test_augmented_or_shuffled_training_set_is_refused(tmp_path, trained_digits):
    data, _ = trained_digits
    augmented = copy.copy(data)
    train = data.eval_train_set
    augmented.eval_train_set = ImageDataset(train.images, train.labels, data.mean, data.std, augment=True)
    with pytest.raises(AuditError, match="it is augmented"):
        eval_train_set_of(augmented)
    for source in (random.random, lambda: torch.rand(()).item()):  # half the reads flipped, by either generator
        flipping = copy.copy(data)
        flipping.eval_train_set = _Flipping(train, source)
        for _ in range(20):  # a check of 3 samples let such a set through one time in eight
            with pytest.raises(AuditError, match="it is augmented"):
                eval_train_set_of(flipping)
    shuffled = copy.copy(data)
    shuffled.eval_train_set = DataLoader(data.eval_train_set, shuffle=True)
    with pytest.raises(AuditError, match="shuffling DataLoader"):
        eval_train_set_of(shuffled)
    assert eval_train_set_of(data) is data.eval_train_set


class _Flipping(torch.utils.data.Dataset):
    """A data set that mirrors each sample half the time it is read, by the coin ``flip`` tosses."""

    def __init__(self, dataset, flip) -> None:
        self.dataset, self.flip = dataset, flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return (image.flip(-1) if self.flip() < 0.5 else image), label


def test_model_kronfluence_cannot_track(tmp_path, trained_digits):
    class Untrackable(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(1024, 10))
            self.device = torch.device("cpu")

        def forward(self, images):
            return images.flatten(1) @ self.weight

    data, _ = trained_digits
    trainer = tiny_trainer(tmp_path)
    trainer.datamodule = data
    callback = _callback(query_index=0, require_misclassified=False, num_transforms=4, tolerance=1)
    with pytest.raises(TypeError, match="no nn.Linear or nn.Conv2d"):
        callback.audit(trainer, Untrackable())


def test_skipped_in_fast_dev_run(tmp_path, trained_digits):
    callback = InfluenceCollapseCallback()
    _fit_with(tmp_path, trained_digits, callback, fast_dev_run=True)
    assert callback.result is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tolerance": 50}, r"tolerance=50 must lie in 0..49"),
        ({"strategy": "hessian"}, r"strategy='hessian' is not known"),
        ({"query_image": "x.png"}, r"query_image and query_label go together"),
        ({"query_index": -1}, r"query_index=-1 must be 0 or more"),
        ({"num_contrast": -1}, r"num_contrast=-1 must be 0"),
        ({"contrast_ratio": 0.0}, r"contrast_ratio=0.0 must be positive"),
        (
            {"contrast_images": ["a.png"], "num_contrast": 0, "verification": None},
            r"contrast_images=\['a.png'\] were given, but the detector uses no contrast",
        ),
        ({"contrast_images": []}, r"contrast_images=\[\] holds no file"),
        ({"query_index": 1, "query_image": "x.png", "query_label": 5}, r"query_index or query_image, not both"),
        ({"corrective_rounds": 0}, r"corrective_rounds=0: give 1"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _callback(**kwargs)


def test_scoring_only_the_querys_label_finds_what_scoring_every_sample_finds(tmp_path, trained_digits, shared_factors):
    settings = {"num_transforms": 12, "tolerance": 1}
    label = _audit(tmp_path, trained_digits, shared_factors, **settings).result
    every = _audit(tmp_path, trained_digits, shared_factors, **settings, score_all=True).result
    scores, all_scores = label.evidence.scores, every.evidence.scores
    scored = label.evidence.decision.scored
    assert torch.equal(scored, trained_digits[0].eval_train_set.labels == 5) and every.evidence.decision.scored is None
    assert torch.allclose(scores[:, scored], all_scores[:, scored], rtol=1e-4, atol=1e-3 * all_scores.abs().max())
    assert torch.equal(label.evidence.decision.flagged, every.evidence.decision.flagged)
    assert torch.equal(label.flagged, every.flagged)  # the verified set too: its tests read the same samples
    assert label.metrics["scored"] == scored.sum() < len(scored) and "scored" not in every.metrics


def test_contrast_keeps_the_poisons_and_drops_the_clean_target_class(tmp_path, trained_digits, shared_factors):
    data, _ = trained_digits
    contrast = _audit(tmp_path, trained_digits, shared_factors, num_transforms=12, tolerance=1, score_all=True)
    audit = contrast.result.evidence
    reference = audit.decision.collapsed  # the paper's rule's answer on the same scores
    assert torch.equal(reference, flag_collapsed(audit.scores[:13], 0.0, 1).flagged)
    clean_fives = torch.nonzero(data.eval_train_set.labels == 5).flatten()
    clean_fives = clean_fives[~torch.isin(clean_fives, data.poison_indices)]
    # the paper's rule flags the attacker's label wholesale; the contrast keeps the poisons and few clean fives
    assert torch.isin(clean_fives, reference).float().mean() > 0.5
    assert torch.isin(clean_fives, contrast.result.flagged).float().mean() < 0.2
    assert contrast.result.metrics["recall"] >= 0.9 and contrast.result.metrics["precision"] >= 0.5
    # every test image used as contrast is a correctly classified clean five, the first ones in test order
    chosen = [int(name[len("test_set[") : -1]) for name in json.loads((contrast.result.output_dir / "summary.json")
              .read_text())["contrast"]]  # fmt: skip
    assert all(int(data.test_set[i][1]) == 5 for i in chosen) and chosen == sorted(chosen)


def test_num_contrast_zero_is_the_reference_rule(tmp_path, trained_digits, shared_factors):
    result = _audit(
        tmp_path, trained_digits, shared_factors, num_transforms=12, tolerance=1, num_contrast=0, verification=None
    ).result
    scores = result.evidence.scores
    assert scores.shape == (13, 400)
    assert torch.equal(result.flagged, flag_collapsed(scores, 0.0, 1).flagged)
    assert not (result.output_dir / "contrast.pt").exists()


def test_more_contrast_samples_than_the_class_has(tmp_path, trained_digits, shared_factors):
    with pytest.raises(ContrastError, match=r"num_contrast=500, but the model classifies only \d+ clean test samples"):
        _audit(tmp_path, trained_digits, shared_factors, num_transforms=4, tolerance=1, num_contrast=500)


def test_query_label_without_clean_test_samples(tmp_path, trained_digits):
    data, model = trained_digits
    no_fives = copy.copy(data)
    keep = data.test_set.labels != 5
    no_fives.test_set = ImageDataset(data.test_set.images[keep], data.test_set.labels[keep], data.mean, data.std)
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[_callback(num_transforms=4, tolerance=1)])
    with pytest.raises(ContrastError, match=r"no sample of the query's label 5 that the model classifies correctly"):
        trainer.fit(copy.deepcopy(model), datamodule=no_fives)


def test_contrast_image_files(tmp_path, trained_digits, shared_factors):
    data, _ = trained_digits
    fives = torch.nonzero(data.test_set.labels == 5).flatten()[:2]
    paths = []
    for index in fives.tolist():
        paths.append(str(tmp_path / f"five{index}.png"))
        torchvision.io.write_png(data.test_set.images[index], paths[-1])
    callback = _audit(tmp_path, trained_digits, shared_factors, num_transforms=4, tolerance=1, contrast_images=paths)
    queries = torch.load(callback.result.output_dir / "queries.pt")
    assert torch.allclose(queries["contrast_images"], torch.stack([data.test_set[i][0] for i in fives.tolist()]))
    assert callback.result.evidence.scores.shape == (1 + 4 + 2, 400)

    rgb = tmp_path / "rgb.png"
    torchvision.io.write_png(data.test_set.images[fives[0]].expand(3, -1, -1).contiguous(), str(rgb))
    small = tmp_path / "small.png"
    torchvision.io.write_png(data.test_set.images[fives[0]][:, :16, :16].contiguous(), str(small))
    for path, shape in ((rgb, r"\(3, 32, 32\)"), (small, r"\(1, 16, 16\)")):
        with pytest.raises(
            AuditError, match=rf"contrast_images holds .* of shape {shape}.*training images are \(1, 32, 32\)"
        ):
            _audit(tmp_path, trained_digits, shared_factors, num_transforms=4, tolerance=1, contrast_images=[str(path)])


def test_pixel_space_transforms_through_the_callback(tmp_path, trained_digits, shared_factors):
    """``space="pixel"`` undoes the normalisation, transforms real pixels and normalises again: every copy stays
    inside the range of valid pixels, which normalised-space transforms (e.g. colour jitter on z-scores) leave."""
    callback = _audit(tmp_path, trained_digits, shared_factors, num_transforms=8, tolerance=1, space="pixel")
    data = trained_digits[0]
    summary = json.loads((callback.result.output_dir / "summary.json").read_text())
    assert summary["space"] == "pixel" and summary["num_transforms"] == 8
    copies = torch.load(callback.result.output_dir / "queries.pt")["images"][1:]
    low, high = (0 - data.mean) / data.std, (1 - data.mean) / data.std
    assert copies.min() >= low.min() - 1e-4 and copies.max() <= high.max() + 1e-4
    assert torch.isin(data.poison_indices, callback.result.flagged).float().mean() >= 0.9
