"""The second opinion: a model that never learned the attack gives back the flagged samples it recognises as members of
their label, and a fit that keeps them confirms it, or the give-back is undone."""

import json

import pytest
import torch
from stand_ins import Flags
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from delta_influence import AuditData, Correction, CorrectiveFit, run_audit
from delta_influence.errors import ConfigError
from delta_influence.second_opinion import SecondOpinion, give_back

CLASS_0, CLASS_1 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]  # two classes by content; the third feature is the trigger


def _model(trigger: float) -> nn.Module:
    """Classifies by content; a model that learned the trigger (``trigger`` > 0) votes class 1 for it."""
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, trigger]]))
    return model


class _ToyFit(CorrectiveFit):
    """A corrective fit whose model learns the trigger exactly when it keeps a training sample that carries it."""

    def __init__(self, train_set: TensorDataset, test_set, attack_test_set, out_dir) -> None:
        super().__init__(len(train_set), test_set, attack_test_set, out_dir, log=lambda line: None)
        self.triggered = train_set.tensors[0][:, 2] > 0

    @property
    def method(self) -> str:
        return "toy"

    def _forget(self, victim: nn.Module, flagged: Tensor, retained: list[int], alone: bool) -> tuple[nn.Module, dict]:
        return _model(8.0 if self.triggered[retained].any() else 0.0), {}


def _case(tmp_path, poisons: list[list[float]], flagged_clean: int):
    """Ten samples of each class and the five ``poisons`` (labelled 1) carrying the trigger; the audit flags the
    poisons and the first ``flagged_clean`` members of class 1. The attack: class-0 content with the trigger, labelled
    1."""
    inputs = torch.tensor([CLASS_0] * 10 + [CLASS_1] * 10 + poisons)
    labels = torch.tensor([0] * 10 + [1] * 10 + [1] * 5)
    train = TensorDataset(inputs, labels)
    test = TensorDataset(torch.tensor([CLASS_0] * 5 + [CLASS_1] * 5), torch.tensor([0] * 5 + [1] * 5))
    attack = TensorDataset(torch.tensor([[1.0, 0.0, 1.0]] * 4), torch.tensor([1] * 4))
    data = AuditData(train, test, attack, poison_indices=torch.arange(20, 25))
    flagged = tuple(range(20, 25)) + tuple(range(10, 10 + flagged_clean))
    audit = run_audit(_model(8.0), data, Flags(indices=flagged), tmp_path / "audit", tmp_path, log=lambda line: None)
    return audit, _ToyFit(train, test, attack, tmp_path / "unlearn")


def test_a_dirty_label_audit_gives_back_the_clean_members_it_flagged_and_keeps_the_poisons(tmp_path):
    audit, fit = _case(tmp_path, [[1.0, 0.0, 1.0]] * 5, flagged_clean=3)  # poisons: class-0 content labelled 1
    correction = Correction(fit, Flags(), tmp_path, rounds=1, log=lambda line: None).run(_model(8.0), audit)
    opinion = correction.second_opinion
    assert opinion.confirmed and opinion.opinion.given_back.tolist() == [10, 11, 12]
    assert correction.final.forgotten.tolist() == [20, 21, 22, 23, 24] and correction.final.corrected.report.asr == 0
    saved = json.loads((tmp_path / "unlearn" / "correction.json").read_text())
    assert saved["second_opinion"]["given_back"] == [10, 11, 12] and saved["final"]["precision"] == 1.0
    assert saved["rounds"][0]["precision"] == 5 / 8 and (tmp_path / "unlearn" / "second_opinion.png").is_file()
    assert (tmp_path / "unlearn" / "toy_second_opinion.ckpt").is_file()


def test_a_clean_label_give_back_that_brings_the_attack_back_is_undone(tmp_path):
    # three poisons of class-1 content labelled 1 (clean-label) beside two of class-0 content (dirty-label)
    audit, fit = _case(tmp_path, [[1.0, 0.0, 1.0]] * 2 + [[0.0, 1.0, 1.0]] * 3, flagged_clean=0)
    correction = Correction(fit, Flags(), tmp_path, rounds=1, log=lambda line: None).run(_model(8.0), audit)
    opinion = correction.second_opinion
    assert opinion.opinion.given_back.tolist() == [22, 23, 24]  # the clean-label ones look like their label ...
    assert opinion.fit.corrected.report.asr == 1.0 and not opinion.confirmed  # ... and carry the attack
    assert opinion.reason.startswith("undone: the model that kept them misbehaves on the query again")
    assert correction.final is correction.rounds[0] and correction.final.forgotten.tolist() == [20, 21, 22, 23, 24]
    assert json.loads((tmp_path / "unlearn" / "correction.json").read_text())["second_opinion"]["confirmed"] is False
    everything = _case(tmp_path / "all", [[0.0, 1.0, 1.0]] * 5, flagged_clean=0)  # every flagged sample recognised
    recognised = Correction(everything[1], Flags(), tmp_path, rounds=1, log=lambda line: None).run(
        _model(8.0), everything[0]
    )
    assert not recognised.second_opinion.confirmed and recognised.second_opinion.fit is None  # no fit to spend
    assert "a fit that kept them all would be the victim's own training" in recognised.second_opinion.reason


def test_without_the_second_opinion_the_audits_set_is_forgotten_as_it_is(tmp_path):
    audit, fit = _case(tmp_path, [[1.0, 0.0, 1.0]] * 5, flagged_clean=3)
    correction = Correction(fit, Flags(), tmp_path, rounds=1, second_opinion=None).run(_model(8.0), audit)
    assert correction.second_opinion is None and len(correction.final.forgotten) == 8


def test_thresholds_come_from_the_labels_clean_test_images():
    train = TensorDataset(torch.tensor([CLASS_1, CLASS_0]), torch.tensor([1, 1]))
    test = TensorDataset(torch.tensor([CLASS_1, [0.0, 0.5, 0.0], CLASS_0]), torch.tensor([1, 1, 0]))
    opinion = give_back(_model(0.0), train, torch.tensor([0, 1]), test, SecondOpinion(quantile=0.5))
    median = torch.tensor([4.0, 2.0]).softmax(0)[0].item()  # class 1's clean images: p(1) = 0.98 and 0.88
    clean = [torch.tensor([0.0, 4.0]).softmax(0)[1].item(), torch.tensor([0.0, 2.0]).softmax(0)[1].item()]
    assert opinion.thresholds[1] == pytest.approx(sum(clean) / 2) and 0 not in opinion.thresholds and median > 0
    assert opinion.given_back.tolist() == [0] and opinion.kept.tolist() == [1]
    with pytest.raises(ConfigError, match=r"second_opinion.quantile=0 must lie in \(0, 1\)"):
        SecondOpinion(quantile=0)
