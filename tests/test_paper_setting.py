"""benchmarks/paper_setting.py, the prepared GPU run of the paper's setting, exercised tiny on the CPU."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import paper_setting  # noqa: E402


def test_paper_setting_runs_end_to_end_tiny(cifar10_root, tmp_path, capsys):
    table = paper_setting.main(
        ["--tiny", "--data.root", str(cifar10_root), "--data.download", "false", "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "| victim clean accuracy / ASR" in printed and "| retrained clean accuracy / ASR" in printed
    assert table["flagged"] > 0 and 0 < table["recall"] <= 1 and table["retrained_asr"] is not None
    assert table["audit_s"] > 0 and table["retrain_s"] > 0 and table["total_s"] > table["audit_s"]
    assert json.loads((Path(table["run"]) / "paper_setting.json").read_text()) == table
