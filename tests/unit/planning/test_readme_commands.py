"""The planner commands documented in examples/deepseek/README.md run and succeed as written."""

import io
import json
import re
import shlex
from pathlib import Path

from megatron.training.planning.cli import main

README = Path(__file__).resolve().parents[3] / "examples" / "deepseek" / "README.md"
SECTION = "## Know before you launch: the layout planner"


def documented_commands():
    text = README.read_text()
    assert SECTION in text
    section = text[text.index(SECTION):]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]
    return commands


def test_documented_planner_commands_succeed():
    commands = documented_commands()
    assert len(commands) == 3
    for command in commands:
        argv = shlex.split(command)
        assert argv[:2] == ["python", "tools/plan_layout.py"], command
        out = io.StringIO()
        assert main(argv[2:], out=out) == 0, command  # 0: fits (or, with --search, some layout fits)
        if "--json" in argv:
            assert json.loads(out.getvalue())["fits"] is True
        elif "--search" in argv:
            assert "feasible of" in out.getvalue() and "infeasible:" in out.getvalue()
        else:
            assert "verdict: FITS" in out.getvalue()
