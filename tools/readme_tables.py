"""Rewrite the README's variable tables from the declarations in fmi_bridge (a test fails when they differ).

.venv/bin/python tools/readme_tables.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fmi_bridge.config import SETTINGS, Setting, markdown_table
from fmi_bridge.container.launch import LAUNCH_SETTINGS

README = Path(__file__).resolve().parent.parent / "README.md"
TABLES: dict[str, tuple[Setting, ...]] = {"subscriber": SETTINGS, "launcher": LAUNCH_SETTINGS}


def render(text: str) -> str:
    for name, settings in TABLES.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(\n<!-- /table:{name} -->)", re.DOTALL)
        table = markdown_table(settings)
        text, count = pattern.subn(lambda match, table=table: match[1] + table + match[2], text)
        if count != 1:
            raise SystemExit(f"README.md: markers for the {name} table not found")
    return text


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
