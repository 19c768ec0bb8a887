"""Corrective fits and the correction loop: the method cores, the six methods, the launch after fit, unlearn.py."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import wandb
from conftest import tiny_trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from stand_ins import Tracer
from torch import nn
from torch.utils.data import TensorDataset
from wandb_records import logged_keys, read_run

from delta_influence import Correction, CorrectionError, DeltaInfluence, FitReport
from delta_influence.audit import AuditData, run_audit
from delta_influence.callbacks import InfluenceCollapseCallback
from delta_influence.cli import unlearn
from delta_influence.correction import verdict
from delta_influence.detectors import Oracle
from delta_influence.errors import ConfigError
from delta_influence.examples import accuracy, evaluating
from delta_influence.lightning_modules import PoisonClassifier
from delta_influence.lightning_modules.unlearning import (
    SCRUB,
    SSD,
    BadTeacher,
    FineTune,
    FitSettings,
    LightningCorrectiveFit,
    Potion,
    Retrain,
    UnlearningData,
    retain_loader,
)
from delta_influence.lightning_modules.unlearning.distillation import ScrubModule
from delta_influence.lightning_modules.unlearning.methods import _reinitialised
from delta_influence.unlearning import (
    bad_teacher_loss,
    distillation_kl,
    importance_ratios,
    importances,
    potion_search,
    ratio_quantiles,
    scrub_forget_loss,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("size", "sizes"),
    [(258, [128, 128]), (320, [128, 128, 64]), (100, [100]), (128, [128])],
)
def test_the_retained_set_never_ends_an_epoch_on_a_tiny_batch(size, sizes):
    retain = torch.utils.data.TensorDataset(torch.arange(size))
    batches = [len(batch) for (batch,) in retain_loader(retain, batch_size=128)]
    assert batches == sizes


def test_scrub_forget_loss_pushes_away_from_the_teacher():
    teacher = torch.tensor([[2.0, 0.0, 0.0]])
    near, far = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    assert scrub_forget_loss(far, teacher) < scrub_forget_loss(near, teacher) == 0
    assert distillation_kl(far, teacher) > 0


def test_bad_teacher_follows_each_samples_teacher():
    good, bad = torch.tensor([[5.0, 0.0], [5.0, 0.0]]), torch.tensor([[0.0, 5.0], [0.0, 5.0]])
    student = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert bad_teacher_loss(student, good, bad, torch.tensor([False, True])).item() == pytest.approx(0.0, abs=1e-6)
    assert bad_teacher_loss(student, good, bad, torch.tensor([True, False])) > 1


def test_importances_are_ssds_squared_batch_gradients_or_potions_label_free_ones():
    layer = nn.Linear(2, 2)
    batches = [(torch.randn(3, 2), torch.tensor([0, 1, 0])), (torch.randn(3, 2), torch.tensor([1, 1, 0]))]
    squared, absolute = torch.zeros_like(layer.weight), torch.zeros_like(layer.weight)
    for inputs, labels in batches:
        layer.zero_grad()
        nn.functional.cross_entropy(layer(inputs), labels).backward()
        squared += layer.weight.grad**2 / 2
        layer.zero_grad()
        layer(inputs).norm(dim=-1).mean().backward()  # no labels
        absolute += layer.weight.grad.abs() / 2
    assert torch.allclose(importances(layer, batches, "cpu")["weight"], squared)
    assert torch.allclose(importances(layer, batches, "cpu", "logit_norm")["weight"], absolute)
    with pytest.raises(ConfigError, match="importance='fisher' is not one of cross_entropy, logit_norm"):
        importances(layer, batches, "cpu", "fisher")


def test_potion_search_stops_at_the_first_share_that_neutralises_the_forget_set():
    layer = nn.Linear(1000, 1, bias=False)
    nn.init.ones_(layer.weight)
    forget = {"weight": torch.arange(1.0, 1001.0)[None]}  # ratios 1, 2, ..., 1000
    kept = {"weight": torch.ones(1, 1000)}
    seen = []

    def forget_accuracy(model):  # the "poison" lives in weight 990 (ratio 991): the accuracy falls once it is dampened
        seen.append(model)
        return 1.0 if model.weight[0, 990] == 1 else 0.0

    found = potion_search(layer, forget, kept, forget_accuracy, start_share=1e-4, step=1.5)
    assert found.reached and found.forget_acc_before == 1.0 and found.forget_acc == 0.0
    assert torch.equal(layer.weight, torch.ones(1, 1000))  # every try dampens a fresh copy
    assert 985 <= found.alpha < 991 and found.model.weight[0, 990].item() == pytest.approx(1 / 991)
    assert found.dampened_fraction == pytest.approx((found.model.weight < 1).float().mean().item())
    assert found.tries == len(seen) - 1
    assert found.share == pytest.approx(1e-4 * 1.5 ** (found.tries - 1))
    # a start that already reaches the target dampens too much: the share shrinks to the least that still reaches it
    down = potion_search(layer, forget, kept, forget_accuracy, start_share=1.0, step=1.5)
    assert down.reached and 985 <= down.alpha < 991 and down.tries > 2
    assert (
        down.dampened_fraction < potion_search(layer, forget, kept, forget_accuracy, 1.0, max_tries=1).dampened_fraction
    )
    # never reached: the share stops at the whole training set; a forget set already missed needs no search
    never = potion_search(layer, forget, kept, lambda model: 1.0, start_share=1e-4, step=2.0)
    assert not never.reached and never.forget_acc == 1.0 and 0.5 < never.share <= 1.0
    missed = potion_search(layer, forget, kept, lambda model: 0.0, start_share=1e-4)
    assert missed.reached and missed.tries == 0 and missed.dampened_fraction == 0.0


def test_dampening_removes_a_backdoor_planted_in_one_weight_and_leaves_the_classes_alone():
    """A linear classifier whose backdoor is one weight: feature 19 (the trigger) votes for class 5 more strongly than
    an eight's own feature votes for 8. Only the forget set (triggered eights labelled 5) uses that weight, so SSD
    and Potion must dampen it and nothing a clean class needs: the triggered eights go back to 8, every clean sample
    stays right."""
    classes, features, target = 10, 20, 5
    model = nn.Linear(features, classes, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[:, :classes] = 5 * torch.eye(classes)
        model.weight[target, 19] = 10.0  # the backdoor
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(classes).repeat(100)
    clean = F.one_hot(labels, features).float() + 0.05 * torch.randn(len(labels), features, generator=generator)
    triggered = F.one_hot(torch.full((20,), 8), features).float()
    triggered[:, 19] = 1.0
    forget = TensorDataset(triggered, torch.full((20,), target))
    full = TensorDataset(torch.cat([clean, triggered]), torch.cat([labels, torch.full((20,), target)]))
    kept = TensorDataset(clean, labels)
    data = UnlearningData(kept, forget, full, FitSettings(batch_size=64), kept=kept)
    for method in (SSD(), Potion()):
        corrected, details = method.run(model, data)
        with torch.no_grad():
            assert (corrected(triggered).argmax(1) == 8).all(), method.name  # the backdoor is gone
            assert (corrected(clean).argmax(1) == labels).all(), method.name  # the classes are not
            changed = torch.nonzero(corrected.weight != model.weight).tolist()
        assert changed == [[target, 19]] and corrected.weight[target, 19] < 1.0, method.name  # that weight alone
        assert details["dampened_fraction"] > 0, method.name


def test_importance_ratio_quantiles_leave_out_undefined_ratios():
    ratios = importance_ratios({"w": torch.tensor([1.0, 0.0, 3.0, 5.0])}, {"w": torch.tensor([1.0, 0.0, 0.0, 1.0])})
    assert ratios.tolist() == [1.0, 5.0]
    assert ratio_quantiles(ratios, (0.0, 1.0)) == {"q0": 1.0, "q1": 5.0}


def _fit(method, trained_digits, tmp_path, max_epochs: int = 1) -> LightningCorrectiveFit:
    data, _ = trained_digits
    return LightningCorrectiveFit(
        method, data.train_set, data.eval_train_set, data.test_set, data.attack_test_set, tmp_path / "unlearn",
        FitSettings(batch_size=32, max_epochs=max_epochs),
    )  # fmt: skip


def _run(method, trained_digits, tmp_path, flagged=None):
    data, victim = trained_digits
    return _fit(method, trained_digits, tmp_path).run(victim, data.poison_indices if flagged is None else flagged)


@pytest.mark.parametrize(
    ("method", "asr_after"),
    [
        (Retrain(), 0.1),
        (FineTune(max_epochs=2), None),  # fine-tuning leaves this backdoor in place, as on CIFAR-10
        # a tiny retained set: smaller batches and steps, one rate throughout (as the reference)
        (SCRUB(batch_size=64, lr=0.005, forget_lr=None, epochs=1, decay=False), 0.1),
        (BadTeacher(batch_size=64, lr=1e-3), 0.1),
    ],
    ids=lambda m: getattr(m, "name", ""),
)
def test_every_training_method_corrects_a_copy_and_all_but_fine_tuning_remove_the_backdoor(
    method, asr_after, trained_digits, tmp_path
):
    data, victim = trained_digits
    before = copy.deepcopy(victim.state_dict())
    torch.manual_seed(0)
    corrected = _run(method, trained_digits, tmp_path)
    report = corrected.report
    assert all(torch.equal(before[k], v) for k, v in victim.state_dict().items())  # victim untouched
    assert report.method == method.name and report.forgotten == 20 and report.retained == 380
    images, targets = zip(*(data.attack_test_set[i] for i in range(len(data.attack_test_set))))
    with torch.no_grad(), evaluating(victim):  # the shared victim keeps its mode
        hits = (victim(torch.stack(images)).argmax(1) == torch.stack(targets)).float().mean().item()
    assert report.before_asr == pytest.approx(hits) and hits >= 0.8  # the backdoor is there to remove
    if asr_after is None:  # the weights move, the clean accuracy rises, the backdoor stays (and is reported so)
        assert report.acc > report.before_acc and report.asr >= 0.8 and report.verdict == "attack not weakened"
    else:
        assert report.asr <= asr_after and report.verdict == "attack weakened"
    saved = PoisonClassifier.load_from_checkpoint(corrected.checkpoint)
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in corrected.model.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in saved.state_dict().items() if v.is_floating_point())
    clean_images, labels = zip(*(data.test_set[i] for i in range(len(data.test_set))))
    with torch.no_grad():  # the saved model's accuracies, counted by hand: the report's numbers
        predicted = saved.eval()(torch.stack(clean_images)).argmax(1)
    labels = torch.stack(labels)
    assert report.acc == pytest.approx((predicted == labels).float().mean().item())
    assert report.label == 5 and report.label_acc == pytest.approx((predicted[labels == 5] == 5).float().mean())
    assert 0 < report.changed_predictions <= 1
    stored = json.loads(corrected.report_path.read_text())
    assert stored["verdict"] == report.verdict and stored["checkpoint"] == corrected.checkpoint.name


def test_scrub_max_steps_run_at_their_own_rate_and_without_alpha_the_teacher_sees_only_the_forget_set(
    trained_digits, monkeypatch
):
    """The max-steps use ``forget_lr`` (decayed as far as ``lr``), the min-steps ``lr`` again; with ``alpha`` 0 the
    teacher's forward pass runs on forget batches only."""
    data, victim = trained_digits
    rates, teacher_batches = [], []
    original = ScrubModule._step

    def step(module, loss):
        rates.append(module.optimizers().optimizer.param_groups[0]["lr"])
        original(module, loss)

    monkeypatch.setattr(ScrubModule, "_step", step)
    monkeypatch.setattr(ScrubModule, "teacher", property(lambda module: _Counted(module.teachers[0], teacher_batches)))
    retain = torch.utils.data.Subset(data.train_set, range(20, 400))  # 380 = 5 x 64 + 60: six batches an epoch
    forget = torch.utils.data.Subset(data.eval_train_set, range(20))
    method = SCRUB(epochs=2, forget_epochs=1, lr=0.01, forget_lr=0.002, batch_size=64, forget_batch_size=8)
    method.run(victim, UnlearningData(retain, forget, data.eval_train_set, FitSettings(32, progress_bar=False)))
    # epoch 0: three max-steps (20 = 8 + 8 + 4) at forget_lr, then six min-steps from lr decaying to 0 over twelve
    assert rates[:3] == pytest.approx([0.002] * 3)
    assert rates[3:] == pytest.approx([0.01 * (1 - step / 12) for step in range(12)])
    assert teacher_batches == [8, 8, 4]


class _Counted(nn.Module):
    """A model that records the size of every batch it sees."""

    def __init__(self, model: nn.Module, seen: list) -> None:
        super().__init__()
        self.model, self.seen = model, seen

    def forward(self, inputs):
        self.seen.append(len(inputs))
        return self.model(inputs)


def test_ssd_on_fitted_samples_dampens_nothing_and_says_so(trained_digits, tmp_path):
    """The reference importance of samples the model fits to near-zero loss (here the 40 it fits best) does not pass
    alpha: the report and the console say that nothing changed, not that the fit succeeded."""
    data, victim = trained_digits
    images, labels = zip(*(data.eval_train_set[i] for i in range(len(data.eval_train_set))))
    with torch.no_grad(), evaluating(victim):
        losses = nn.functional.cross_entropy(victim(torch.stack(images)), torch.stack(labels), reduction="none")
    fitted = losses.argsort()[:40]
    assert losses[fitted].max() < 0.01
    with pytest.warns(UserWarning, match="Corrective fit ssd: changed nothing"):
        report = _run(SSD(importance="cross_entropy"), trained_digits, tmp_path, flagged=fitted).report
    assert report.details["dampened_fraction"] == 0.0 and report.details["q1"] < 10
    assert report.verdict == "changed nothing" and report.changed_predictions == 0
    assert report.asr == report.before_asr


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [(0.935, 0.929, "attack not weakened"), (0.935, 0.9, "attack weakened"), (1.0, 0.99, "attack weakened")],
)
def test_a_fall_of_the_asr_within_its_noise_is_not_called_a_weakened_attack(before, after, expected):
    # 1,000 attack images at an ASR of 93.5 %: a standard error of 0.78 points, so a fall of 0.6 is noise
    report = FitReport("retrain", 10, 90, 0.5, before, 0.5, 0.5, after, 5, 0.5, 1000, 0.1, "", 1.0)
    assert verdict(report) == expected
    report.changed_predictions = 0.0
    assert verdict(report) == "changed nothing"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: SSD(alpha=0), "SSD needs alpha > 0 and lam > 0; got alpha=0"),
        (lambda: SSD(importance="fisher"), "SSD's importance='fisher' is not one of cross_entropy, logit_norm"),
        (lambda: Potion(rho=1.0), "Potion needs 0 <= rho < 1.*got rho=1.0"),
        (lambda: Potion(step=1.0), "Potion needs .*step > 1.*step=1.0"),
        (lambda: SCRUB(forget_epochs=-1), "SCRUB needs .*forget_epochs >= 0.*forget_epochs=-1"),
        (lambda: SCRUB(lr=0), "SCRUB needs .*lr > 0.*lr=0"),
        (lambda: SCRUB(forget_lr=-1e-3), "SCRUB needs .*forget_lr > 0.*forget_lr=-0.001"),
        (lambda: SCRUB(alpha=-1), "SCRUB needs .*alpha >= 0.*alpha=-1"),
        (lambda: BadTeacher(retain_fraction=0), "BadTeacher needs .*0 < retain_fraction <= 1.*retain_fraction=0"),
        (lambda: BadTeacher(epochs=0), "BadTeacher needs epochs >= 1.*epochs=0"),
        (lambda: FineTune(max_epochs=0), "max_epochs=0 must be at least 1"),
    ],
)
def test_bad_settings_are_refused_with_one_message(make, message):
    with pytest.raises(CorrectionError, match=message):
        make()


def test_reinitialising_refuses_partial_models_and_leaves_the_global_random_state_alone():
    class Partly(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2))  # no reset_parameters() covers it

        def forward(self, x):
            return self.layer(x) * self.scale

    first, second = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    torch.manual_seed(5)
    state = torch.get_rng_state()
    fresh = _reinitialised(first, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    again = _reinitialised(nn.Sequential(first[0], nn.ReLU(), second[0]), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), again.parameters()))  # seeded
    with pytest.raises(CorrectionError, match=r"cannot re-initialise Partly .*: scale belong to no layer"):
        _reinitialised(Partly(), seed=0)


def test_retrain_trains_as_long_as_the_victim_in_steps_or_epochs(trained_digits, tmp_path):
    data, victim = trained_digits
    by_steps = LightningCorrectiveFit.of(
        data, tiny_trainer(tmp_path, max_epochs=None, max_steps=3), tmp_path, Retrain()
    )
    assert (by_steps.settings.max_epochs, by_steps.settings.max_steps) == (None, 3)
    rarely = LightningCorrectiveFit.of(data, tiny_trainer(tmp_path, check_val_every_n_epoch=4), tmp_path, Retrain())
    rarely = rarely.settings
    assert rarely.check_val_every_n_epoch == 4  # a retrain validates as often as the victim did
    retain = torch.utils.data.Subset(data.train_set, range(200))
    for length, steps in (({"max_epochs": None, "max_steps": 3}, 3), ({"max_epochs": 2, "max_steps": -1}, 12)):
        corrected, _ = Retrain(seed=1).run(victim, UnlearningData(retain, retain, retain, FitSettings(32, **length)))
        assert corrected.trainer.global_step == steps  # 200 = 6 x 32 + 8: 6 batches an epoch (the 8 dropped)
    settings = FitSettings(32, max_epochs=5, check_val_every_n_epoch=4)
    once, _ = Retrain(max_epochs=1).run(victim, UnlearningData(retain, retain, retain, settings))
    assert once.trainer.global_step == 6  # the method's own length wins
    assert once.trainer.check_val_every_n_epoch == 4
    with pytest.raises(CorrectionError, match="max_epochs=0 must be at least 1"):
        Retrain(max_epochs=0)


def test_checkpoints_are_never_overwritten(trained_digits, tmp_path):
    first = _run(SSD(), trained_digits, tmp_path)
    second = _run(SSD(alpha=5), trained_digits, tmp_path)
    assert first.checkpoint.name == "ssd.ckpt" and second.checkpoint.name == "ssd-2.ckpt"
    assert second.report_path.name == "ssd-2.json" and json.loads(second.report_path.read_text())["checkpoint"] == (
        "ssd-2.ckpt"
    )
    assert torch.load(first.checkpoint, weights_only=False)["unlearning"]["acc"] == first.report.acc


def test_a_report_that_cannot_be_written_takes_its_checkpoint_with_it(trained_digits, tmp_path, monkeypatch):
    """A signal (or a full disk) after the checkpoint is published and before its report is: neither is left."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("delta_influence.correction.json.dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(SSD(), trained_digits, tmp_path)
    assert not list((tmp_path / "unlearn").glob("*"))


def test_empty_flagged_set_is_skipped(trained_digits, tmp_path, caplog):
    assert _run(Retrain(), trained_digits, tmp_path, flagged=torch.tensor([], dtype=torch.long)) is None
    assert "nothing to forget" in caplog.text
    assert not (tmp_path / "unlearn").exists()


def test_whole_training_set_flagged(trained_digits, tmp_path):
    with pytest.raises(CorrectionError, match="all 400 training samples are flagged"):
        _run(Retrain(), trained_digits, tmp_path, flagged=torch.arange(400))


def test_flagged_indices_out_of_range(trained_digits, tmp_path):
    with pytest.raises(IndexError, match=r"\[400, 1000\] lie outside 0..399"):
        _run(Retrain(), trained_digits, tmp_path, flagged=torch.tensor([3, 400, 1000]))


def test_corrective_fit_after_fit_leaves_the_outer_run_intact(trained_digits, tmp_path):
    data, victim = trained_digits
    logger = WandbLogger(project="test", save_dir=str(tmp_path))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints")
    # the oracle audits at no cost (what the corrective fit does after a fit is the point here), through the same
    # pipeline and W&B media as Δ-Influence
    callback = InfluenceCollapseCallback(detector=Oracle(), unlearning=Retrain(max_epochs=1))
    trainer = tiny_trainer(
        tmp_path, max_epochs=1, logger=logger, callbacks=[checkpoint, callback], num_sanity_val_steps=0
    )
    model = copy.deepcopy(victim)
    trainer.fit(model, datamodule=data)

    assert trainer.state.finished and trainer.lightning_module is model
    assert "val/asr" in trainer.callback_metrics and trainer.global_step == 13
    saved = torch.load(checkpoint.best_model_path, weights_only=False)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in model.state_dict().items())
    corrected = callback.correction.final.corrected
    report = corrected.report
    assert corrected.checkpoint.parent == tmp_path / "run" / "unlearn" and report.flagged_by == "oracle"
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 1
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    run = read_run(run_dir)
    assert {"val/acc", "audit/oracle/recall", "unlearn/acc", "unlearn/asr", "unlearn/time_s"} <= logged_keys(run)
    assert "audit/top_flagged" in logged_keys(run) and report.forgotten == len(data.poison_indices)
    assert run["summary"]["comparison/after_asr"] == pytest.approx(report.asr)
    assert run["summary"]["unlearn/method"] == "retrain"
    assert run["summary"]["unlearn/stopped"] == callback.correction.stopped


def _unlearn_args(tmp_path, victim_path, indices_path, *extra):
    return [
        "--config", str(ROOT / "configs" / "digits_badnets.yaml"),
        "--data.per_class", "40", "--data.attack.init_args.num_poisons", "20",
        "--data.crop_padding", "0", "--trainer.max_epochs", "1", "--trainer.logger", "false",
        "--data.attack.init_args.pixels", "[[28, 30], [30, 30], [29, 29], [30, 28]]",  # the shared victim's trigger
        "--victim", str(victim_path), "--indices", str(indices_path), "--out_dir", str(tmp_path / "out"), *extra,
    ]  # fmt: skip


def test_unlearn_script_from_a_checkpoint_and_an_index_file(trained_digits, tmp_path):
    data, victim = trained_digits
    victim_path = tmp_path / "victim.ckpt"
    torch.save({"state_dict": victim.state_dict()}, victim_path)
    indices = tmp_path / "flagged.json"
    indices.write_text(json.dumps({"flagged": data.poison_indices.tolist()}))
    corrected = unlearn.main(_unlearn_args(tmp_path, victim_path, indices, "--unlearning", "SSD"))
    report = corrected.report
    assert report.method == "ssd" and report.forgotten == 20 and report.flagged_by == str(indices)
    assert report.before_asr == pytest.approx(accuracy(victim, data.attack_test_set))
    assert corrected.checkpoint == tmp_path / "out" / "ssd.ckpt"


def test_unlearn_script_refuses_a_missing_or_mismatched_victim(trained_digits, tmp_path):
    indices = tmp_path / "flagged.txt"
    indices.write_text("1\n2\n")
    with pytest.raises(CorrectionError, match="--victim=.*is not a file"):
        unlearn.main(_unlearn_args(tmp_path, tmp_path / "nope.ckpt", indices))
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": PoisonClassifier(arch="resnet18", in_channels=1).state_dict()}, other)
    with pytest.raises(CorrectionError, match="does not match the configured model"):
        unlearn.main(_unlearn_args(tmp_path, other, indices))


def test_unlearn_script_takes_the_newest_audit_of_the_whole_training_set_never_a_rounds(tmp_path):
    """A run folder with the first audit, a corrective round's audit (of the samples a corrected model kept: only that
    round's additions) written after it, and an older audit by another detector: ``--run`` forgets the first audit's
    set; a later audit of the whole set, whatever its detector or name, replaces it."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    (run / "checkpoints" / "last.ckpt").write_text("")

    def audit(name: str, finished: str, **extra) -> None:
        (run / name).mkdir()
        (run / name / "flagged.json").write_text(json.dumps({"flagged": [1]}))
        (run / name / "summary.json").write_text(json.dumps({"detector": name, "finished": finished, **extra}))

    audit("spectral_signatures", "2026-01-01T10:00:00")
    audit("delta_influence", "2026-01-01T11:00:00")
    audit("delta_influence_round2", "2026-01-01T12:00:00", part_of_training_set="train_indices.pt")
    args = unlearn.from_run_folder(["--run", str(run)])
    assert args[args.index("--indices") + 1] == str(run / "delta_influence" / "flagged.json")
    audit("delta_influence-2", "2026-01-01T13:00:00")  # `train.py audit` run again later
    assert unlearn.newest_audit(run) == run / "delta_influence-2"
    assert unlearn.from_run_folder(["--run", str(run), "--indices", "mine.json"])[-2:] == ["--indices", "mine.json"]


def test_only_global_rank_zero_audits_and_corrects(trained_digits, tmp_path, monkeypatch):
    data, victim = trained_digits
    detector = DeltaInfluence(num_transforms=4, tolerance=1)
    callback = InfluenceCollapseCallback(detector, unlearning=Retrain(max_epochs=1))
    trainer = tiny_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    monkeypatch.setattr(type(trainer.strategy), "is_global_zero", property(lambda self: False))
    trainer.fit(copy.deepcopy(victim), datamodule=data)
    assert callback.result is None and callback.correction is None
    assert not list(tmp_path.rglob("delta_influence")) and not list(tmp_path.rglob("unlearn"))


def test_a_corrected_model_that_still_misbehaves_is_audited_by_delta_influence_and_refitted_without_what_it_finds(
    trained_digits, tmp_path
):
    """The first audit finds 2 of the 20 poisons, so the retrain keeps the backdoor; Δ-Influence audits the retrained
    model on the 398 samples it kept, finds the other poisons there (indices into the whole training set), and the
    second fit, without everything flagged, puts the query right: no third round."""
    data, victim = trained_digits
    fit = _fit(Retrain(), trained_digits, tmp_path, max_epochs=6)
    first = run_audit(victim, AuditData.of(data), Tracer(most=2), tmp_path / "audit", tmp_path / "factors")
    detector = DeltaInfluence(num_transforms=16, tolerance=1)
    torch.manual_seed(0)
    correction = Correction(fit, detector, tmp_path / "factors", rounds=3, second_opinion=None).run(victim, first)

    one, two = correction.rounds  # the retrain without 2 of the 20 poisons kept the backdoor
    assert one.corrected.report.forgotten == 2 and one.corrected.report.asr >= 0.5
    assert two.audit.output_dir == tmp_path / "audit_round2" and two.audit.title == "Δ-Influence"
    poisons, found = set(data.poison_indices.tolist()), set(first.flagged.tolist())
    again = set(json.loads((tmp_path / "audit_round2" / "flagged.json").read_text())["flagged"])
    assert again == set(two.audit.flagged.tolist()) and not again & found  # whole-set indices of kept samples
    assert len(again & (poisons - found)) >= 16 and len(again & poisons) / len(again) >= 0.8
    audited = torch.load(tmp_path / "audit_round2" / "train_indices.pt")
    assert len(audited) == 398 and not found & set(audited.tolist())
    final = two.corrected.report
    assert final.round == 2 and final.forgotten == len(found | again) and final.asr <= 0.1
    assert final.flagged_by == "audit_round2" and two.corrected.checkpoint.name == "retrain_round2.ckpt"
    assert correction.stopped.startswith("the corrected model no longer predicts the attacker's label 5")
    summary = json.loads((tmp_path / "unlearn" / "correction.json").read_text())
    assert [entry["checkpoint"] for entry in summary["rounds"]] == ["retrain.ckpt", "retrain_round2.ckpt"]
    assert summary["stopped"] == correction.stopped and summary["rounds"][0]["asr"] == one.corrected.report.asr
    with pytest.raises(CorrectionError, match=r"corrective_rounds=0: give 1"):
        Correction(fit, detector, tmp_path / "factors", rounds=0)


def test_the_callback_runs_the_rounds_and_logs_them(trained_digits, tmp_path):
    data, victim = trained_digits
    logger = WandbLogger(project="test", save_dir=str(tmp_path))
    # the tracer finds 10 poisons in each audit: the victim's 20 in two rounds
    callback = InfluenceCollapseCallback(detector=Tracer(most=10), unlearning=Retrain(max_epochs=6))
    trainer = tiny_trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[callback])
    trainer.fit(copy.deepcopy(victim), datamodule=data)

    first, second = callback.correction.rounds  # the default two: the first retrain keeps the backdoor, the second not
    assert first.corrected.report.asr >= 0.5 and len(second.audit.flagged) == 10
    assert second.corrected.report.forgotten == 20 and second.corrected.report.asr <= 0.1
    assert (second.audit.output_dir / "flagged.json").is_file()
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    run = read_run(run_dir)
    assert {"audit/tracer/flagged", "audit/round2/flagged", "unlearn/rounds"} <= logged_keys(run)
    assert run["summary"]["unlearn/rounds"] == 2 and run["summary"]["audit/round2/flagged"] == 10
