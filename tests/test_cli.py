"""The command line (train.py, unlearn.py): its configs, its errors and what it logs to W&B."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from wandb_records import logged_keys, read_run

from delta_influence.callbacks import InfluenceCollapseCallback
from delta_influence.cli import run_command, train, unlearn
from delta_influence.errors import ConfigError
from delta_influence.lightning_modules import PoisonClassifier
from delta_influence.stages import read_stages

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits_badnets.yaml")


def _small(tmp_path, *extra: str) -> list[str]:
    """The offline default, shrunk to seconds."""
    return [
        "--config", DIGITS,
        "--trainer.max_epochs", "4",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--data.per_class", "60",
        "--data.attack.init_args.num_poisons", "30",
        "--detector.num_contrast", "5",  # a 4-epoch victim gets about 20 of the test set's fives right
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("config", sorted(str(p) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_config_parses_and_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: delta_influence.attacks." in printed and "max_epochs" in printed


def test_override_and_class_path_reach_the_objects(tmp_path):
    cli = train.main(
        [
            *_small(tmp_path, "--model.lr", "0.01", "--data.attack.init_args.victim", "3"),
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    assert cli.model.hparams.lr == 0.01 and cli.model.hparams.in_channels == 1
    assert cli.datamodule.attack.victim == 3 and cli.trainer.max_epochs == 4


@pytest.mark.parametrize(
    "override, message",
    [
        (["--data.attack.init_args.victim", "10"], "attack.victim=10 is out of range"),
        (["--data.attack.init_args.target", "8"], "victim and attack.target are both 8"),
        (["--data.dataset", "cifar10", "--data.root", "/nonexistent", "--data.download", "false"], "--data.root="),
    ],
)
def test_bad_input_stops_before_training_with_a_clear_message(tmp_path, override, message, capsys):
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as error:
        train.main(["fit", *_small(tmp_path, *override), "--trainer.logger", "false"])
    shown = str(error.value) + capsys.readouterr().err
    assert message in shown
    assert not list(Path(tmp_path).rglob("*.ckpt"))


def test_the_detector_and_the_audit_are_sections_of_their_own(tmp_path, monkeypatch):
    def audits(*extra: str) -> list:
        cli = train.main([*_small(tmp_path, *extra), "--trainer.logger", "false"], run=False)
        assert None not in cli.trainer.callbacks
        return [callback for callback in cli.trainer.callbacks if isinstance(callback, InfluenceCollapseCallback)]

    (callback,) = audits("--detector", "SpectralSignatures", "--delta_influence.query_index", "3")
    assert callback.detector.name == "spectral_signatures" and callback.choice.index == 3
    assert audits("--delta_influence=null") == []
    (callback,) = audits("--trainer.callbacks=[]", "--detector.contrast_ratio", "2.5")  # the default detector's
    assert callback.detector.contrast_ratio == 2.5 and callback.detector.support_floor == 0.045
    refused = {  # the old forms, each with the new one named
        ("--delta_influence.contrast_ratio", "2.5"): r"a setting of the detector: --detector.contrast_ratio",
        ("--delta_influence.verify", "false"): r"--detector.verification null turns it off",
        ("--trainer.callbacks.init_args.tolerance", "1"): r"a setting of the detector: --detector.tolerance",
        ("--delta_influence.detector.tolerance", "1"): r"the detector is a section of its own",
    }
    for old, message in refused.items():
        with pytest.raises(ConfigError, match=rf"{re.escape(old[0])}: .*{message}"):
            train.main([*_small(tmp_path), *old], run=False)
    earlier = tmp_path / "earlier.yaml"  # a config of the form before the split
    earlier.write_text(yaml.safe_dump({"delta_influence": {"num_transforms": 8, "unlearning": None}}))
    with pytest.raises(ConfigError, match=r"move num_transforms from `delta_influence:` to a top-level `detector:`"):
        audits("--config", str(earlier))
    twice = tmp_path / "twice.yaml"  # the audit callback in the list as well
    twice.write_text(yaml.safe_dump(
        {"trainer": {"callbacks": [{"class_path": "delta_influence.callbacks.InfluenceCollapseCallback"}]}}
    ))  # fmt: skip
    with pytest.raises(ConfigError, match=r"as well as the `delta_influence` section: the audit would run twice"):
        audits("--config", str(twice))


def test_too_many_poisons_stops_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"attack.num_poisons=70 is more than the 60"):
        train.main(["fit", *_small(tmp_path, "--data.attack.init_args.num_poisons", "70"), "--trainer.logger", "false"])
    assert not list(Path(tmp_path).rglob("*.ckpt"))


NOISE = [
    "You defined a `validation_step` but have no `val_dataloader`",
    "module(s) in eval mode",
    "torch.cuda.amp.GradScaler",
    "The anonymous setting has no effect",
    "git root",
    "Tip:",
    "isinstance(treespec, LeafSpec)",
    "Traceback",
]


def _command(tmp_path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Runs an entry point as a user would: a fresh process, outside any git repository, W&B not silenced and with a
    W&B service of its own (not the one this test process may have started)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_SERVICE")} | env
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=environment, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_a_run_folder_holds_everything_and_the_output_is_quiet(tmp_path, monkeypatch, capsys):
    """The offline default, run as a user would, is quiet; its run folder holds the resolved config, the victim
    checkpoint, the audit, the corrective fit's report and the stages' record; moved elsewhere, it still serves
    unlearn.py and an audit that logs into the same W&B run."""
    fit = _command(  # 2 epochs in batches of 16: more steps than 4 epochs in the config's batches of 64 took
        tmp_path, "train.py", "fit", "--config", DIGITS, "--trainer.max_epochs", "2", "--data.batch_size", "16",
        "--data.per_class", "60", "--data.attack.init_args.num_poisons", "30", "--detector.num_transforms", "16",
        "--detector.num_contrast", "5",  # a 2-epoch victim gets about 30 of the test set's fives right
        "--delta_influence.unlearning", "SCRUB",
        "--delta_influence.unlearning.epochs", "1", "--delta_influence.unlearning.batch_size", "64",
        "--delta_influence.corrective_rounds", "1",
    )  # fmt: skip
    output = fit.stdout + fit.stderr
    assert fit.returncode == 0, output[-3000:]
    assert [message for message in NOISE if message in output] == []
    assert "Δ-Influence flagged" in output and "Corrective fit 'scrub'" in output  # the project's own summaries stay
    assert re.search(r"; \d+ of the \d+ samples of the label collapse", output)  # only the label was scored
    assert "Written to runs/delta-influence/" in output and "corrected model: runs/delta-influence/" in output

    (run,) = (tmp_path / "runs" / "delta-influence").iterdir()
    names = ["checkpoints", "config.yaml", "delta_influence", "stages.json", "unlearn"]
    assert sorted(p.name for p in run.iterdir()) == names
    assert {stage: entry["status"] for stage, entry in read_stages(run).items()} == dict.fromkeys(
        ["fit", "audit", "corrective fit"], "finished"
    )
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["per_class"] == 60 and config["trainer"]["max_epochs"] == 2
    assert config["data"]["attack"]["class_path"] == "delta_influence.attacks.BadNets"
    assert config["delta_influence"]["init_args"]["unlearning"]["class_path"].endswith(".SCRUB")
    assert config["detector"]["init_args"]["num_transforms"] == 16
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    assert torch.load(checkpoint, weights_only=False)["config"] == config
    report = json.loads((run / "unlearn" / "scrub.json").read_text())
    assert report["method"] == "scrub" and report["forgotten"] > 0 and report["checkpoint"] == "scrub.ckpt"
    assert report["flagged_by"] == "delta_influence" and report["round"] == 1
    assert {"before_acc", "before_asr", "acc", "asr", "time_s"} <= set(report)

    (wandb_run,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith(run.name)  # the run folder is named by the W&B run's id
    records = read_run(wandb_run)
    assert records["config"]["config"] == config and records["config"]["run_config"].endswith("config.yaml")
    keys = logged_keys(records)
    for key in ["train/loss", "train/acc", "val/acc", "val/asr", "audit/flagged", "audit/precision", "audit/recall",
                "audit/f1", "audit/factors_s", "audit/scores_s", "audit/verify_s", "audit/rule_flagged", "audit/kept",
                "audit/recovered", "unlearn/acc", "unlearn/asr"]:  # fmt: skip
        assert key in keys, key
    media = {key: row[key]["_type"] for row in records["history"] for key in row if isinstance(row[key], dict)}
    assert media["audit/queries"] == media["audit/collapse_counts"] == media["audit/verification"] == "images/separated"
    assert media["audit/top_flagged"] == "table-file"
    assert any(name.startswith("flagged-") for name in records["artifacts"])
    assert [row["val/asr"] for row in records["history"] if "val/asr" in row][-1] >= 0.5  # the attack took hold

    # the run folder moved as a whole; from it alone, unlearn.py runs the corrective fit its config names (in this
    # process: the fit above ran the command line as a user does) ...
    moved = tmp_path / "elsewhere" / run.name
    moved.parent.mkdir()
    run.rename(moved)
    monkeypatch.chdir(tmp_path)
    again = unlearn.main(["--run", str(moved), "--trainer.max_epochs", "1", "--trainer.logger", "false"])
    assert again.report.method == "scrub" and again.checkpoint == moved / "unlearn" / "scrub-2.ckpt"
    assert again.report.flagged_by == "delta_influence/flagged.json"
    # ... and the model is audited again by another detector (an audit alone: no --correct), into the same folder and
    # the same W&B run
    train.main(
        ["audit", "--config", str(moved / "config.yaml"), "--ckpt_path", str(moved / "checkpoints" / checkpoint.name),
         "--detector", "SpectralSignatures"]
    )  # fmt: skip
    wandb.finish()
    summary = json.loads((moved / "spectral_signatures" / "summary.json").read_text())
    flagged = json.loads((moved / "spectral_signatures" / "flagged.json").read_text())["flagged"]
    assert summary["detector"] == "spectral_signatures" and summary["metrics"]["flagged"] == len(flagged) > 0
    audit_runs = [path for path in (tmp_path / "runs" / "wandb").glob(f"offline-run-*-{run.name}") if path != wandb_run]
    assert len(audit_runs) == 1 and "audit/spectral_signatures/flagged" in logged_keys(read_run(audit_runs[0]))
    other = tmp_path / "other.ckpt"  # weights of another architecture, without hyperparameters to rebuild it from
    torch.save({"state_dict": PoisonClassifier(arch="resnet18", in_channels=1).state_dict()}, other)
    capsys.readouterr()  # the command line's own handling (as train.py runs it), in this process: status 2, the message
    with pytest.raises(SystemExit) as wrong:
        run_command(lambda: train.main(["audit", "--config", str(moved / "config.yaml"), "--ckpt_path", str(other)]))
    wandb.finish()
    assert wrong.value.code == 2 and "does not match the configured model" in capsys.readouterr().err

    names = {p.name for p in (moved / "unlearn").iterdir()}  # the first corrective fit's files are kept
    assert {"correction.json", "scrub-2.ckpt", "scrub-2.json", "scrub.ckpt", "scrub.json"} <= names
    assert {name for name in names if "second_opinion" in name} == names - {  # and what its second opinion wrote
        "correction.json", "scrub-2.ckpt", "scrub-2.json", "scrub.ckpt", "scrub.json"}  # fmt: skip
    assert yaml.safe_load((moved / "config.yaml").read_text()) == config


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stage", "marker"),
    [("audit", "Δ-Influence: query"), ("corrective fit", "Corrective fit (retrain, round 1)")],
)
def test_a_signal_during_a_stage_ends_the_command_with_its_status_and_how_to_finish_it(
    tmp_path, monkeypatch, stage, marker
):
    environment = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_SERVICE")}
    longer = ["--delta_influence.unlearning.max_epochs", "40"]  # a retrain that lasts until the signal comes
    quick = ["--trainer.max_epochs", "2", "--data.per_class", "30", "--data.attack.init_args.num_poisons", "15",
             "--detector.num_transforms", "8", "--detector.num_contrast", "0",
             "--detector.verification", "null", "--delta_influence.query_index", "0",
             "--delta_influence.require_misclassified", "false"]  # fmt: skip
    command = [sys.executable, str(ROOT / "train.py"), "fit", *_small(tmp_path / "runs"), "--trainer.logger", "false"]
    command += quick + (longer if stage == "corrective fit" else [])
    process = subprocess.Popen(
        command, cwd=tmp_path, env=environment | {"PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    seen = []
    for line in process.stdout:  # a scheduler's time limit, as the stage starts
        seen.append(line)
        if marker in line:
            process.send_signal(signal.SIGTERM)
            break
    seen += process.stdout.readlines()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(seen)[-3000:]
    message = [line for line in seen if line.startswith("error: ")]
    assert message and f"the {stage} was interrupted (SIGTERM) before it finished" in message[0]
    run = tmp_path / "runs"
    entry = read_stages(run)[stage]
    assert entry["status"] == "interrupted" and entry["finish"] in message[0]
    # nothing half-made: no audit folder when the audit stopped, no corrected model when the corrective fit did
    assert not (run / "unlearn").exists() and (stage == "corrective fit") == (run / "delta_influence").is_dir()

    # the printed command finishes it from the run folder
    monkeypatch.chdir(tmp_path)
    finish = entry["finish"].removeprefix("Finish it with: python ").split()
    if finish[0] == "unlearn.py":  # the run's own corrective fit (its config's Retrain), shortened for the test
        unlearn.main([*finish[1:], "--trainer.logger", "false", "--unlearning.max_epochs", "1"])
    else:  # the audit and the whole correction loop again (its fits, of the config's Retrain, shortened likewise)
        train.main([*finish[1:], "--trainer.logger", "false", "--delta_influence.unlearning.max_epochs", "1"])
    stages = read_stages(run)
    assert stages[stage]["status"] == "finished" and stages["corrective fit"]["status"] == "finished"
    assert (run / "delta_influence" / "flagged.json").is_file() and (run / "unlearn" / "retrain.json").is_file()


def test_a_bad_value_ends_the_command_with_its_message_alone(tmp_path, capsys, monkeypatch):
    bad = ["fit", "--config", DIGITS, "--data.attack.init_args.victim", "10", "--trainer.logger", "false"]
    with pytest.raises(SystemExit) as exit_info:
        run_command(lambda: train.main(bad))
    printed = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in printed
    assert printed.startswith("error: attack.victim=10 is out of range") and "DELTA_INFLUENCE_TRACEBACK=1" in printed
    monkeypatch.setenv("DELTA_INFLUENCE_TRACEBACK", "1")  # the error itself, with its traceback
    with pytest.raises(ConfigError, match="attack.victim=10 is out of range"):
        run_command(lambda: train.main(bad))
