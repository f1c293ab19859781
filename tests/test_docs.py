"""The documentation's runnable snippets run as printed.

Every ```python block of ``docs/quickstart.md`` runs, and so does every ```python block of another
page that is immediately preceded by the marker line ``<!-- docs-test: run -->`` (an HTML comment,
invisible on the rendered site). Each block runs on its own in a fresh namespace, so it must be a
complete program. After it ran, the properties its variables promise are checked (the NLL went
down, the ELBO went up, ...). ``filterwarnings = error`` applies: snippets must be warning-free.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARKER = "<!-- docs-test: run -->"
ALL_BLOCKS_RUN = ("quickstart.md",)


def runnable_snippets() -> list[tuple[str, int, str]]:
    """``(page, first line, code)`` of every block that must run."""
    snippets = []
    for page in sorted(DOCS.glob("*.md")):
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```python":
                previous = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
                end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
                if page.name in ALL_BLOCKS_RUN or previous == MARKER:
                    snippets.append((page.name, i + 2, textwrap.dedent("\n".join(lines[i + 1:end]) + "\n")))
                i = end
            i += 1
    return snippets


SNIPPETS = runnable_snippets()


def test_snippets_found() -> None:
    pages = {page for page, _, _ in SNIPPETS}
    assert "quickstart.md" in pages and "normflows.md" in pages
    assert sum(page == "quickstart.md" for page, _, _ in SNIPPETS) >= 2


def _check_promises(namespace: dict) -> None:
    """What the snippets' variable names promise."""
    if "nll_before" in namespace:
        assert namespace["nll_after"] < namespace["nll_before"] - 0.5
    if "elbo_before" in namespace:
        assert namespace["elbo_after"] > namespace["elbo_before"] + 1.0
        assert namespace["elbo_after"] < 0.1  # -KL(q || p) of a normalised model, up to noise
    if "log_q" in namespace and "log_p" in namespace:
        assert torch.allclose(namespace["log_q"], namespace["log_p"], atol=1e-4)


@pytest.mark.parametrize(("page", "line", "code"), SNIPPETS, ids=[f"{p}:{n}" for p, n, _ in SNIPPETS])
def test_snippet_runs(page: str, line: int, code: str, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict = {"__name__": f"docs_{Path(page).stem}_{line}"}
    # Pad with blank lines so tracebacks point at the page's own line numbers.
    exec(compile("\n" * (line - 1) + code, str(DOCS / page), "exec"), namespace)
    assert capsys.readouterr().out.strip(), "a snippet should print what it demonstrates"
    _check_promises(namespace)
