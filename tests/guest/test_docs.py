"""The guest code's citations of docs/kvm.md name sections that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kvm_doc_citations_name_existing_sections() -> None:
    headings = set(re.findall(r"^## (.+)$", (ROOT / "docs" / "kvm.md").read_text(), re.M))
    cited: dict[str, str] = {}
    for path in [*(ROOT / "src" / "livemig" / "guest").rglob("*.py"), *(ROOT / "tests" / "guest").glob("*.py")]:
        text = " ".join(path.read_text().split())  # citations may wrap across lines and comment marks
        for section in re.findall(r'docs/kvm\.md, "([^"]+)"', text):
            cited[section] = path.name
    assert cited, "no citations found"
    missing = {s: f for s, f in cited.items() if s not in headings}
    assert not missing, f"cited sections missing from docs/kvm.md: {missing}"
