"""The family × capability table of docs/models.md, made from the matrix test's results.

Runs ``tests/models/test_families.py`` (about a minute and a half on one CPU thread) with
``TUNEFORGE_FAMILY_MATRIX`` set, so the test writes what each family did, and renders that as Markdown: printed,
and written between the table markers of docs/models.md and README.md.

    python benchmarks/family_matrix.py                  # run the test, update docs/models.md and README.md
    python benchmarks/family_matrix.py --results r.json # render a saved result file only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "docs" / "models.md", ROOT / "README.md")
START, END = "<!-- family-matrix:start -->", "<!-- family-matrix:end -->"
COLUMNS = ("full", "freeze", "lora", "qlora", "packing", "fused loss", "peft", "merge/export", "generate")
MARKS = {"trains": "✓", "exact": "✓ exact", "= model loss": "✓", "same logits": "✓", "runs": "✓"}


def run_matrix(out: Path) -> int:
    """Run the matrix test writing its results to ``out``; its exit code."""
    env = {**os.environ, "TUNEFORGE_FAMILY_MATRIX": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/models/test_families.py"]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def render(results: dict) -> str:
    """The Markdown table (one row per family, a cell per capability; ✗: the test failed or did not run), then the
    families refused at start, with the message that refuses them."""
    lines = ["| family | `model_type` | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    refused = []
    for family, model_type in results["families"].items():
        row = results["results"].get(family, {})
        if "refused" in row:
            refused.append(f"- **{family}** (`{model_type}`): refused at start: {row['refused']}")
            continue
        cells = [MARKS.get(row.get(c, ""), row.get(c, "✗")) for c in COLUMNS]
        lines.append(f"| {family} | `{model_type}` | " + " | ".join(cells) + " |")
    if refused:
        lines += ["", "Refused families (the test asserts the refusal):", "", *refused]
    return "\n".join(lines)


def write_docs(table: str) -> None:
    for doc in DOCS:
        head, rest = doc.read_text().split(START, 1)
        doc.write_text(f"{head}{START}\n{table}\n{END}{rest.split(END, 1)[1]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, help="a result file the test wrote (skips running it)")
    args = parser.parse_args()
    code = 0
    path = args.results
    if path is None:
        path = Path(tempfile.mkdtemp()) / "family_matrix.json"
        code = run_matrix(path)
    table = render(json.loads(path.read_text()))
    print(table)
    write_docs(table)
    return code


if __name__ == "__main__":
    sys.exit(main())
