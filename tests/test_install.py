"""The installed wheel beside a user's own project: everything under ``delta_influence``, nothing a project's own
``callbacks.py``, ``datamodules/`` or ``train.py`` could collide with."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ["pyproject.toml", "README.md", "delta_influence", "callbacks", "cli", "datamodules", "lightning_modules"]

# the user's project: its own callbacks.py, datamodules/ and train.py, which imports the callback as the README says
USER_CALLBACKS = """
import pytorch_lightning as pl


class EpochCounter(pl.Callback):
    def __init__(self):
        self.epochs = 0

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs += 1
"""
USER_DATAMODULES = '''
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def _stripes(count, generator):
    labels = torch.arange(count) % 3
    images = torch.randn(count, 1, 24, 24, generator=generator) * 0.3
    for label in range(3):
        images[labels == label, :, :, label * 8 : label * 8 + 8] += 1.0
    return images, labels


class StripesDataModule(pl.LightningDataModule):
    """Three classes of stripes; 12 class-2 images get a bright corner and the label 0."""

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        images, labels = _stripes(150, generator)
        self.poison_indices = torch.nonzero(labels == 2).flatten()[:12]
        images[self.poison_indices, :, -4:, -4:] = 3.0
        labels[self.poison_indices] = 0
        self.eval_train_set = TensorDataset(images, labels)
        test, _ = _stripes(20, generator)
        test[:, :, :, 16:24] += 1.0
        test[:, :, -4:, -4:] = 3.0
        self.attack_test_set = TensorDataset(test, torch.zeros(20, dtype=torch.long))
        self.test_set = TensorDataset(*_stripes(30, generator))

    def train_dataloader(self):
        return DataLoader(self.eval_train_set, batch_size=16, shuffle=True)
'''
USER_TRAIN = """
import json
import sys

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from callbacks import EpochCounter  # the project's own
from datamodules import StripesDataModule  # the project's own
from delta_influence.lightning import DeltaInfluence, InfluenceCollapseCallback, Retrain


class TinyNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                                 nn.Linear(8 * 36, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


pl.seed_everything(0)
audit = InfluenceCollapseCallback(  # the stripes' test set holds 10 images of the attacker's label
    DeltaInfluence(num_transforms=20, num_contrast=5, train_batch_size=50), unlearning=Retrain()
)
counter = EpochCounter()
trainer = pl.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=sys.argv[1], callbacks=[counter, audit])
trainer.fit(TinyNet(), datamodule=StripesDataModule())
report = audit.correction.final.corrected.report
import delta_influence
result = {"module": delta_influence.__file__, "epochs": counter.epochs, "recall": audit.result.metrics["recall"],
          "flagged": len(audit.result.flagged), "before_asr": report.before_asr, "asr": report.asr}
print(json.dumps(result))
"""
# `python -S train.py <runs>` as the user runs it, then, in the same interpreter (a second one would take as long again
# to import torch, Lightning and the rest), the installed console command's `--help`, reported as one JSON line
RECIPE_THEN_HELP = """
import contextlib, io, json, runpy, sys

sys.argv = ["train.py", sys.argv[1]]
runpy.run_path("train.py", run_name="__main__")
sys.argv, shown, status = ["delta-influence", "--help"], io.StringIO(), 0
with contextlib.redirect_stdout(shown):
    try:
        from delta_influence.cli import train_command

        train_command()
    except SystemExit as end:
        status = end.code
print(json.dumps({"status": status, "help": shown.getvalue()}))
"""


@pytest.mark.slow
def test_the_wheel_installs_under_its_own_name_and_runs_the_recipe_beside_a_users_project(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in PACKAGED:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path)], check=True)
    (wheel,) = tmp_path.glob("delta_influence-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"delta_influence"}  # no generic module
    entry_points = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("entry_points.txt"))
    assert "delta-influence = delta_influence.cli:train_command" in zipfile.ZipFile(wheel).read(entry_points).decode()
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    project = tmp_path / "project"
    (project / "datamodules").mkdir(parents=True)
    (project / "callbacks.py").write_text(USER_CALLBACKS)
    (project / "datamodules" / "__init__.py").write_text(USER_DATAMODULES)
    (project / "train.py").write_text(USER_TRAIN)
    # -S: no site folder, so that no .pth file (the checkout's editable install among them) puts this repository on
    # the path; only the installed wheel provides delta_influence, and the dependencies come from the environment's
    # own site-packages, named explicitly after it
    environment = os.environ | {"PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])}
    run = subprocess.run(
        [sys.executable, "-S", "-c", RECIPE_THEN_HELP, str(tmp_path / "runs")], cwd=project, env=environment,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    *_, recipe, help_text = run.stdout.strip().splitlines()
    result = json.loads(recipe)
    assert Path(result["module"]).is_relative_to(site) and result["epochs"] == 15  # the project's callback ran too
    assert result["recall"] >= 0.75 and result["flagged"] <= 30 and result["before_asr"] >= 0.5 >= result["asr"]
    help_text = json.loads(help_text)
    assert help_text["status"] == 0 and "{fit,validate,test,predict,audit}" in help_text["help"]
