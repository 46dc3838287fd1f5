"""The docs test's runner (tests/docs_runner.py) on small Markdown files: what counts as a shell block,
the skip marker, and what makes a block fail. The docs themselves run in tests/e2e/test_docs_examples.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from demo.stack import REPO
from tests.docs_runner import DocRun, DocsError, console_commands, extract_blocks

FENCE = "```"


def _doc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(text.replace("'''", FENCE))
    return path


def _run(tmp_path: Path, doc: Path) -> DocRun:
    run = DocRun(tmp_path / "cwd", dict(os.environ), timeout=20)
    try:
        for block in extract_blocks(doc, "doc.md"):
            if block.skip is None:
                run.run(block)
    finally:
        run.stop()
    return run


def test_shell_blocks_are_found_by_tag_or_by_their_first_command_and_markers_skip_them(
    tmp_path: Path,
) -> None:
    doc = _doc(
        tmp_path,
        "'''bash\necho a\n'''\n\n'''\nsmiles/\n  manifest.jsonl\n'''\n\n'''\n# a comment\ncurl -s x\n'''\n\n"
        "<!-- docs-test: skip (needs a Kubernetes cluster) -->\n'''console\n$ kubectl get pods\n'''\n\n"
        "'''python\nprint(1)\n'''\n",
    )
    blocks = extract_blocks(doc, "doc.md")
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (1, "bash", None),
        (10, "sh", None),
        (16, "console", "needs a Kubernetes cluster"),
    ]


def test_an_unknown_marker_is_an_error_not_a_silent_run(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "<!-- docs-test: skipp (typo) -->\n'''bash\necho a\n'''\n")
    with pytest.raises(DocsError, match=r"doc.md:1: unknown docs-test marker"):
        extract_blocks(doc, "doc.md")


def test_a_failing_block_fails_with_its_place_and_output(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "text\n\n'''bash\necho before\nfalse\necho after\n'''\n")
    with pytest.raises(DocsError, match=r"doc.md:3 \(bash block\) exited 1") as err:
        _run(tmp_path, doc)
    assert "before" in str(err.value) and "after\n" not in str(err.value).split("--- output:")[1]


def test_variables_and_directory_carry_from_block_to_block(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "'''bash\nW=$(mktemp -d -p .)\nexport X=1\nmkdir -p $W/sub && cd $W/sub\n'''\n\n"
        "'''console\n$ test \"$X\" = 1 && test \"$(basename $(dirname $PWD))\" = \"$(basename $W)\"\n'''\n",
    )
    assert [r.split(" ")[0] for r in _run(tmp_path, doc).ran] == ["doc.md:1", "doc.md:7"]


def test_console_commands_keep_continuations_quotes_and_here_documents_together() -> None:
    cmds = console_commands(
        '$ a \\\n    b\nout 1\n$ c -d "{\n  \\"k\\": 1}" x\n$ cat > f <<\'EOF\'\n{"x": 1}\nEOF\n$ d\n{"x": 1}\n'
    )
    assert [c.text for c in cmds] == [
        "a \\\n    b",
        'c -d "{\n  \\"k\\": 1}" x',
        "cat > f <<'EOF'\n{\"x\": 1}\nEOF",
        "d",
    ]
    assert [c.documented for c in cmds] == ["out 1\n", "", "", '{"x": 1}\n']


def test_a_console_command_must_exit_0_unless_the_docs_show_an_error(tmp_path: Path) -> None:
    shown = _doc(tmp_path, "'''console\n$ sh -c 'echo \"ERROR: no\"; exit 3'\nERROR: no\n'''\n")
    _run(tmp_path, shown)
    hidden = _doc(tmp_path, "'''console\n$ sh -c 'echo oops; exit 3'\nfine\n'''\n")
    with pytest.raises(DocsError, match=r"doc.md:1: `sh -c 'echo oops; exit 3'` exited 3"):
        _run(tmp_path, hidden)


def test_documented_json_must_keep_its_keys_and_its_problem_type(tmp_path: Path) -> None:
    ok = _doc(tmp_path, '\'\'\'console\n$ echo \'{"id": "x9", "n": 2}\'\n{"id": "a1", "n": 1}\n\'\'\'\n')
    _run(tmp_path, ok)
    renamed = _doc(tmp_path, "'''console\n$ echo '{\"ident\": \"x9\"}'\n{\"id\": \"a1\"}\n'''\n")
    with pytest.raises(DocsError, match=r"the docs show keys \['id'\], the command printed \['ident'\]"):
        _run(tmp_path, renamed)
    p = "https://huvidpo.dev/problems/"
    other = _doc(
        tmp_path,
        f'\'\'\'console\n$ echo \'{{"type": "{p}not-found", "status": 404}}\'\n'
        f'{{"type": "{p}validation-error", "status": 422}}\n\'\'\'\n',
    )
    with pytest.raises(DocsError, match=r"the docs show the problem .*validation-error"):
        _run(tmp_path, other)
    unexpected = _doc(tmp_path, f"'''console\n$ echo '{p}conflict'\n'''\n")
    with pytest.raises(DocsError, match=r"answered a problem the docs do not show"):
        _run(tmp_path, unexpected)


def test_what_a_block_leaves_in_the_background_is_stopped_with_the_document(tmp_path: Path) -> None:
    doc = _doc(tmp_path, "'''bash\nsleep 300 &\necho $! > pid\n'''\n")
    _run(tmp_path, doc)
    pid = int((tmp_path / "cwd" / "pid").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"the background sleep {pid} still runs")


def test_every_marker_in_the_docs_parses() -> None:
    for pattern in ("README.md", "services/*/README.md", "docs/*.md", "deploy/README.md"):
        for path in REPO.glob(pattern):
            for block in extract_blocks(path, str(path.relative_to(REPO))):
                assert block.skip is None or len(block.skip) > 10, block.where
