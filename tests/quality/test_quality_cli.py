"""nirvana-quality end to end at toy size on a copy of the exported repository."""

import json
import shutil
from pathlib import Path

import pytest

from nirvana_quality import cli, harness

pytestmark = pytest.mark.timeout(900)
REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def test_report_and_written_thresholds(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    out, calibration = tmp_path / "report", tmp_path / "calibration.json"
    code = cli.main(["--repository", str(repo), "--per-band", "1", "--candidates", "40", "--baseline", "6", "--ks", "2,4",
                     "--steps", "6", "--threads", "1", "--output", str(out), "--write-thresholds",
                     "--calibration", str(calibration)])
    assert code == 0
    report = json.loads((out / "quality.json").read_text())
    assert report["baseline"]["captions"] == 6 and 0.0 <= report["baseline"]["adherence"] <= 1.0
    assert {r["k"] for r in report["rows"]} == {2, 4}
    for name in ("quality.md", "quality.png", "no_cache_grid.png", "hits_grid.png"):
        assert (out / name).stat().st_size > 0
    written = json.loads(calibration.read_text())
    assert written["thresholds"] == harness.calibrate(written["rows"], written["gate"], floor=written["floor"]) \
        == report["thresholds"]
    for path in repo.glob("*/1/pipeline.json"):
        assert json.loads(path.read_text())["thresholds"] == written["thresholds"]


def test_write_thresholds_needs_the_shapes_scorer(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"prompt": "a red circle"}\n{"prompt": "a red circle, 4k"}\n')
    assert cli.main(["--repository", str(REPOSITORY), "--prompts", str(log), "--write-thresholds",
                     "--output", str(tmp_path / "r")]) == 1
    assert "--write-thresholds" in capsys.readouterr().err
