"""The whole chain under Lightning's DDP: two CPU processes (gloo), as a user turns it on from the command line."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import DIGITS, _command

from delta_influence.audit import AuditData, run_audit
from delta_influence.cli import train

TESTS = str(Path(__file__).resolve().parent)


@pytest.mark.slow
def test_two_process_ddp_trains_audits_and_corrects_in_two_rounds(tmp_path):
    """The audit's passes split across both processes; the first corrective fit under DDP; the audit keeps only half
    of what Δ-Influence flags (15 of 30 poisons), so the retrained model still misbehaves and process 0 runs the
    second round alone: an audit of what it kept and a fit on one device, with the same fit object."""
    # 3 epochs in batches of 16 a process: about the steps of 12 epochs in the config's batches of 64, in a quarter of
    # the epochs for the victim and for each corrective fit (as long as the victim's); the backdoor takes hold as well
    result = _command(
        tmp_path, "train.py", "fit", "--config", DIGITS, "--trainer.max_epochs", "3", "--data.batch_size", "16",
        "--data.per_class", "60", "--data.attack.init_args.num_poisons", "30",
        "--detector", "stand_ins.PartialDeltaInfluence",
        "--detector.most", "15", "--detector.num_transforms", "16",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", PYTHONPATH=TESTS,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Starting with 2 processes" in output
    (run,) = (tmp_path / "runs" / "delta-influence").iterdir()  # one run folder: the audit, its round, the fits
    names = ["checkpoints", "config.yaml", "delta_influence", "delta_influence_round2", "stages.json", "unlearn"]
    assert sorted(p.name for p in run.iterdir()) == names
    # the second opinion recognises none of the 30 poisons: a picture, no fit of its own
    fits = ["correction.json", "retrain.ckpt", "retrain.json", "retrain_round2.ckpt", "retrain_round2.json",
            "second_opinion.png"]  # fmt: skip
    assert sorted(p.name for p in (run / "unlearn").iterdir()) == fits
    assert len(list((tmp_path / "runs" / "wandb").glob("offline-run-*"))) == 1
    first = json.loads((run / "unlearn" / "retrain.json").read_text())
    second = json.loads((run / "unlearn" / "retrain_round2.json").read_text())
    assert first["processes"] == 2 and first["forgotten"] == 15 and first["before_asr"] > 0.5 and first["asr"] > 0.5
    assert second["processes"] == 1 and second["forgotten"] == 30 and second["asr"] < 0.1
    assert second["flagged_by"] == "delta_influence_round2"
    assert json.loads((run / "stages.json").read_text())["corrective fit"]["status"] == "finished"
    flagged = json.loads((run / "delta_influence" / "flagged.json").read_text())["flagged"]

    # the same weights audited in one process, with a fresh factor cache, flag the same samples
    (checkpoint,) = (run / "checkpoints").glob("*.ckpt")
    settings = yaml.safe_load((run / "config.yaml").read_text())
    for fit_only in ("ckpt_path", "weights_only"):  # options of the `fit` command, not of the objects
        settings.pop(fit_only)
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(settings))
    cli = train.main(["--config", str(tmp_path / "saved.yaml"), "--trainer.strategy", "auto",
                      "--trainer.devices", "1", "--trainer.logger", "false"], run=False)  # fmt: skip
    data, model = cli.datamodule, cli.model
    data.prepare_data()
    data.setup("fit")
    model.load_state_dict(torch.load(checkpoint, weights_only=False)["state_dict"])
    (callback,) = [c for c in cli.trainer.callbacks if hasattr(c, "detector")]
    data_view = AuditData.of(data)
    alone = run_audit(model, data_view, callback.detector, tmp_path / "alone", tmp_path / "fresh", callback.choice)
    assert alone.flagged.tolist() == flagged and not alone.summary["factors_reused"]
    # the two processes shared every pass by data partition: each one's seconds of each, and the same scores
    summary = json.loads((run / "delta_influence" / "summary.json").read_text())
    assert {len(seconds) for seconds in summary["process_timings"].values()} == {2}
    assert {"covariance_s", "lambda_s", "scores_s"} <= set(summary["process_timings"])
    shared, single = torch.load(run / "delta_influence" / "scores.pt"), alone.detection.evidence.scores
    # within float tolerance: the DDP processes compute with one thread each, which rounds the data's last bit
    # differently from the single process (so the factors' cache key differs too)
    scored = single.isfinite()  # the samples of the query's label, all the default rule can flag
    assert torch.equal(shared.isfinite(), scored) and scored.any(dim=0).sum() < scored.shape[1]
    assert (shared[scored] - single[scored]).abs().max() <= 1e-3 * single[scored].abs().max()
