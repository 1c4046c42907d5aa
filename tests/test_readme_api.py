"""The README's Python API section: its snippets run, in order, on a tiny run."""

import re
from pathlib import Path

from conftest import copy_trained

README = Path(__file__).resolve().parents[1] / "README.md"


def api_snippets() -> list[str]:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_python_api_snippets_run(tiny_run, tmp_path, capsys):
    run = copy_trained(tiny_run, tmp_path / "run")
    snippets = api_snippets()
    assert len(snippets) == 4
    scope: dict = {}
    for code in snippets:
        exec(compile(code.replace('"runs/cpu"', repr(str(run))), "README", "exec"), scope)
    out = capsys.readouterr().out
    assert "'ppl'" in out and "oracle_ppl" in out and "gain" in out and "torch.Size([4, 8])" in out
    assert (run / "oracle" / scope["name"] / "per_token.parquet").is_file()
