"""benchmarks/paper_setting.py, the prepared GPU run of the paper's setting, exercised tiny on the CPU."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paper_setting  # noqa: E402
import pytest  # noqa: E402
from test_cli import _command  # noqa: E402

from delta_influence.attacks import BadNets  # noqa: E402
from delta_influence.datamodules import PoisonedDataModule  # noqa: E402


@pytest.mark.slow
def test_paper_setting_runs_end_to_end_tiny(cifar10_root, tmp_path, capsys):
    table = paper_setting.main(
        ["--tiny", "--data.root", str(cifar10_root), "--data.download", "false", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| victim clean accuracy / ASR" in printed and "| retrained clean accuracy / ASR" in printed
    run = Path(table["run"])
    flagged = set(json.loads((run / "delta_influence" / "flagged.json").read_text())["flagged"])
    data = PoisonedDataModule("cifar10", str(cifar10_root), False, attack=BadNets(num_poisons=10), per_class=20)
    data.setup("fit")
    poisons = set(data.poison_indices.tolist())  # the tiny run's poisons (the config's attack, --tiny's sizes)
    assert table["flagged"] == len(flagged) and table["recall"] == pytest.approx(len(flagged & poisons) / len(poisons))
    correction = json.loads((run / "unlearn" / "correction.json").read_text())
    final = json.loads((run / "unlearn" / correction["final"]["checkpoint"]).with_suffix(".json").read_text())
    assert len(correction["rounds"]) == table["rounds"] and final["asr"] == table["retrained_asr"] is not None
    assert json.loads((Path(table["run"]) / "paper_setting.json").read_text()) == table


@pytest.mark.slow
def test_paper_setting_on_two_devices_splits_the_audit_and_prints_one_table(tmp_path):
    """The multi-device form as Lightning runs it (the script started once more for the second process), on two CPU
    processes and the offline digits in place of CIFAR-10."""
    result = _command(
        tmp_path, "benchmarks/paper_setting.py", "--tiny", "--data.dataset", "digits", "--data.attack.init_args.value",
        "1.0", "--data.per_class", "30", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator",
        "cpu", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.count("| victim clean accuracy / ASR") == 1 and "on 2 x cpu" in result.stdout
    (saved,) = (tmp_path / "runs").rglob("paper_setting.json")
    table = json.loads(saved.read_text())
    assert table["devices"] == 2 and table["audit_covariance_s"] > 0 and table["audit_epochs"] > 0
    assert {len(seconds) for seconds in table["audit_process_s"].values()} == {2}  # each process's share
