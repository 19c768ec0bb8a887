"""train.py: the LightningCLI entry point, its configs, its errors and what it logs to W&B."""

from pathlib import Path

import pytest
import wandb
from wandb_records import logged_keys, read_run

import train

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
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("config", sorted(str(p) for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_parses_and_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: delta_influence.attacks." in printed and "max_epochs" in printed


def test_offline_default_trains_audits_and_logs_to_wandb(tmp_path):
    cli = train.main(["fit", *_small(tmp_path)])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    run_dir = Path(cli.trainer.logger.experiment.dir).parent
    wandb.finish()
    run = read_run(run_dir)
    keys = logged_keys(run)
    for key in ["train/loss", "train/acc", "val/acc", "val/asr", "test/acc", "test/asr"]:
        assert key in keys, key
    for key in ["audit/flagged", "audit/precision", "audit/recall", "audit/f1", "audit/factors_s", "audit/scores_s"]:
        assert key in keys, key
    media = {key: row[key]["_type"] for row in run["history"] for key in row if isinstance(row[key], dict)}
    assert media["audit/queries"] == media["audit/collapse_counts"] == "images/separated"
    assert media["audit/top_flagged"] == "table-file"
    assert any(name.startswith("flagged-") for name in run["artifacts"])
    val_asr = [row["val/asr"] for row in run["history"] if "val/asr" in row]
    assert val_asr[-1] >= 0.5  # the attack took hold, even in this tiny run
    assert len(list(Path(tmp_path).rglob("delta_influence/summary.json"))) == 1


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
        (["--model.arch", "vgg"], "model.arch='vgg' is not a known architecture"),
        (["--data.dataset", "cifar10", "--data.root", "/nonexistent", "--data.download", "false"], "--data.root="),
    ],
)
def test_bad_input_stops_before_training_with_a_clear_message(tmp_path, override, message, capsys):
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as error:
        train.main(["fit", *_small(tmp_path, *override), "--trainer.logger", "false"])
    shown = str(error.value) + capsys.readouterr().err
    assert message in shown
    assert not list(Path(tmp_path).rglob("*.ckpt"))


def test_too_many_poisons_stops_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"attack.num_poisons=70 is more than the 60"):
        train.main(["fit", *_small(tmp_path, "--data.attack.init_args.num_poisons", "70"), "--trainer.logger", "false"])
    assert not list(Path(tmp_path).rglob("*.ckpt"))
