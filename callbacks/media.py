"""An audit and a corrective fit as W&B media: the audit's pictures, a table of the top flagged samples, the flagged
indices as an artifact, the before/after comparison."""

import torch
from torch import Tensor

from delta_influence.audit import AuditResult
from delta_influence.correction import FitReport


def log_audit(logger, result: AuditResult, top_k: int) -> None:
    """Logs an audit's pictures (``audit/<picture>``), a table of its ``top_k`` flagged samples with the highest
    scores, and the flagged indices as an artifact."""
    import wandb

    for picture in result.pictures:
        logger.log_image(f"audit/{picture.stem}", [str(picture)])
    rows, images = result.top_flagged(top_k)
    columns = ["rank", "index", "image", "label", "score", "contrast_score", "collapse_count", "poison"]
    data = [
        [row["rank"], row["index"], wandb.Image(to_hwc(image)), row["label"], row["score"], row["contrast"],
         row["count"], row["poison"]]
        for row, image in zip(rows, images)
    ]  # fmt: skip
    logger.log_table("audit/top_flagged", columns=columns, data=data)
    artifact = wandb.Artifact(f"flagged-{logger.experiment.id}", type="delta-influence-audit")
    artifact.add_file(str(result.output_dir / "flagged.json"))
    logger.experiment.log_artifact(artifact)


def to_hwc(image: Tensor):
    """[C, H, W] in [0, 1] to a uint8 H x W (x C) array for W&B."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    return array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).numpy()


def log_comparison_to_wandb(logger, report: FitReport, stopped: str) -> None:
    """Puts the before/after comparison of the last corrective fit, and why the correction loop stopped, in the run's
    summary and as a table."""
    logger.experiment.summary.update(
        {
            "unlearn/method": report.method,
            "unlearn/stopped": stopped,
            "comparison/before_acc": report.before_acc,
            "comparison/before_asr": report.before_asr,
            "comparison/after_acc": report.acc,
            "comparison/after_asr": report.asr,
            "comparison/before_label_acc": report.before_label_acc,
            "comparison/after_label_acc": report.label_acc,
        }
    )
    logger.log_table(
        "unlearn/comparison",
        columns=["model", "clean_acc", "asr", "label_acc"],
        data=[
            ["victim", report.before_acc, report.before_asr, report.before_label_acc],
            [f"{report.method}, round {report.round}", report.acc, report.asr, report.label_acc],
        ],
    )
