"""The README's Pyro quickstart runs as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quickstart_runs(capsys) -> None:
    snippet = re.search(r"## Quickstart \(Pyro\)\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    loss, bound, shape = capsys.readouterr().out.split(" ", 2)
    assert float(loss) < 3.0 and float(bound) < 1
    assert namespace["flow"].sample((5,)).shape == (5, 2)
