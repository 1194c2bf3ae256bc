"""The Mermaid export (fsm/diagrams.py) and `pp1 diagrams` (pp1/diagrams_cmd.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pp1.cli import main as cli_main
from pp1.fsm.base import ProtocolMachine
from pp1.fsm.diagrams import INDEX_FILE, all_diagrams, machine_classes, mermaid

CLASSES = machine_classes()
IDS = [c.NAME for c in CLASSES]
EDGE = re.compile(r"^\s*(\S+) --> (\S+): (.+)$")
NODE = re.compile(r'^\s*state "([^"]+)" as (\S+)$')


def test_committed_diagrams_are_up_to_date(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["diagrams", "--check"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("cls", CLASSES, ids=IDS)
def test_mermaid_holds_every_state_and_transition(cls: type[ProtocolMachine]) -> None:
    text = mermaid(cls)
    lines = text.splitlines()
    assert lines[0] == "stateDiagram-v2"
    nodes = {m.group(2) for line in lines if (m := NODE.match(line))}
    assert nodes == set(cls.STATES)
    edges: set[tuple[str, str, str]] = set()
    for line in lines:
        m = EDGE.match(line)
        if m:
            src, dst, labels = m.groups()
            edges |= {(src, dst, label.strip()) for label in labels.split("|")}
    expected = set()
    for t in cls.transition_dicts():
        for src in t["source"] if isinstance(t["source"], list) else [t["source"]]:
            expected.add((src, t["dest"], t["trigger"]))
    assert edges == expected
    assert f"  [*] --> {cls.INITIAL}" in lines
    for s in cls.TERMINAL:
        assert f"  {s} --> [*]" in lines
    assert all(line == line.rstrip() for line in lines)


def test_output_is_deterministic() -> None:
    assert all_diagrams() == all_diagrams()


def test_pages_and_index() -> None:
    files = all_diagrams()
    assert set(files) == {f"{c.NAME}.md" for c in CLASSES} | {INDEX_FILE}
    for cls in CLASSES:
        page = files[f"{cls.NAME}.md"]
        assert page.startswith(f"# `{cls.NAME}`\n") and "```mermaid\nstateDiagram-v2\n" in page
        assert f"({cls.NAME}.md)" in files[INDEX_FILE]
    assert "## What each state runs" in files["lifecycle_leader.md"]


def test_write_then_check_then_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    specs = tmp_path / "specs"
    assert cli_main(["diagrams", "--check", "--specs-dir", str(specs)]) == 1
    assert "missing:" in capsys.readouterr().err
    assert cli_main(["diagrams", "--specs-dir", str(specs)]) == 0
    assert cli_main(["diagrams", "--check", "--specs-dir", str(specs)]) == 0
    out = specs / "diagrams"
    (out / "worker.md").write_text("edited\n", encoding="utf-8")
    (out / "leader.md").unlink()
    (out / "old_machine.md").write_text("stale\n", encoding="utf-8")
    capsys.readouterr()
    assert cli_main(["diagrams", "--check", "--specs-dir", str(specs)]) == 1
    err = capsys.readouterr().err
    assert f"differs: {out / 'worker.md'}" in err
    assert f"missing: {out / 'leader.md'}" in err
    assert f"extra: {out / 'old_machine.md'}" in err
    assert "lifecycle_front.md" not in err
    assert cli_main(["diagrams", "--specs-dir", str(specs)]) == 0  # rewrites, removes the extra one
    assert not (out / "old_machine.md").exists()
    assert cli_main(["diagrams", "--check", "--specs-dir", str(specs)]) == 0
