"""The prepared GPU check runs end to end on the CPU with the tiny preset (issue 17: it cannot rot)."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "tiny", "cpu", "--cpu-reference",
                           "--steps", "6", "--oracle-tokens", "256", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gpu check: passed" in proc.stdout
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["failures"] == [] and summary["train"]["steps"] == 6
    assert summary["oracle"]["relative_difference"] < 0.01 and summary["generate"]["fixed"]["tokens"] > 0
