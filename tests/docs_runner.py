"""Runs the shell examples of the Markdown docs, so the docs cannot rot (used by tests/e2e/test_docs_examples.py).

A *shell block* is a fenced block tagged ``bash``, ``sh``, ``shell`` or ``console``, or an untagged one
whose first command is a program (``curl ...``, ``.venv/bin/...``, ``VAR=...``), not a file tree. Each is
either run or skipped by a marker on the line before its fence, which a reader sees too::

    <!-- docs-test: skip (needs a Kubernetes cluster) -->

``bash``/``sh`` blocks run as one script under ``set -eo pipefail`` (and ``curl`` fails on an HTTP
error: an example that gets a 4xx is broken). ``console`` blocks run command by command (``$ `` lines
and their continuation lines); the lines after a command are its documented output. A command must
exit 0 unless its documented output shows an error (``ERROR:``, ``error:``, a problem+json ``type``);
it must not answer a problem+json unless the docs show one; and where the documented output is JSON
objects, the actual output must be JSON objects with the same keys (values such as ids and times differ).

The blocks of one document run in order in one temporary directory (with links to the repository's
top-level entries, so ``.venv/bin/...`` and ``protos`` resolve) and share shell variables and the working
directory, as when a reader pastes them one after the other. Processes a block leaves in the background
(``... &``) live until the document ends and are then stopped by their process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SHELL_LANGS = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"<!--\s*docs-test:(.*?)-->")
SKIP = re.compile(r"^\s*skip\s*\((.+)\)\s*$", re.S)
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
# Programs an untagged block may start with that need not be installed where the docs are parsed.
KNOWN_PROGRAMS = {
    "python",
    "huvidpo",
    "grpcurl",
    "curl",
    "make",
    "kubectl",
    "docker",
    "kind",
    "go",
    "protoc",
    "npm",
}
PROBLEM = "https://huvidpo.dev/problems/"
EXPECTED_ERROR = re.compile(r"ERROR:|error:|\"type\": \"https://huvidpo\.dev/problems/|Traceback")


class DocsError(AssertionError):
    """A block failed, or the Markdown says something the runner does not understand."""


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass
class Command:
    """One ``$ `` command of a console block and the output the docs show for it."""

    text: str
    documented: str


def _is_shell_untagged(text: str) -> bool:
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word = line.split()[0]
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word) or word.startswith((".venv/", "./", "$")):
            return True
        return word in KNOWN_PROGRAMS or (not word.endswith("/") and shutil.which(word) is not None)
    return False


def extract_blocks(path: Path, name: str | None = None) -> list[Block]:
    """Every shell block of a Markdown file, with the skip marker before its fence (if any)."""
    name = name or str(path)
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m["fence"], m["lang"].lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        indent = len(m["indent"])
        body = "\n".join(ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[i + 1 : j])
        i = j + 1
        if not (lang in SHELL_LANGS or (lang == "" and _is_shell_untagged(body))):
            continue
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        skip = None
        if k >= 0 and (mm := MARKER.search(lines[k])):
            sm = SKIP.match(mm[1])
            if not sm:
                raise DocsError(f"{name}:{k + 1}: unknown docs-test marker {mm[0]!r} (write: skip (reason))")
            skip = sm[1].strip()
        blocks.append(Block(name, start + 1, lang or "sh", body, skip))
    return blocks


def console_commands(text: str) -> list[Command]:
    """The ``$ `` commands of a console block with their continuation lines, and their documented output."""
    commands: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            if not commands:
                if lines[i].strip():
                    raise DocsError(f"console block: output before any '$ ' command: {lines[i]!r}")
            else:
                commands[-1].documented += lines[i] + "\n"
            i += 1
            continue
        cmd = lines[i][2:]
        i += 1
        while i < len(lines) and _incomplete(cmd):
            cmd += "\n" + lines[i]
            i += 1
        commands.append(Command(cmd, ""))
    return commands


HEREDOC = re.compile(r"(?<!<)<<-?\s*(['\"]?)(\w+)\1")


def _incomplete(cmd: str) -> bool:
    if cmd.rstrip().endswith("\\"):
        return True
    if (m := HEREDOC.search(cmd)) and cmd.splitlines()[-1].strip() != m[2]:
        return True  # a here-document goes on until its delimiter line
    try:
        shlex.split(cmd)
    except ValueError:  # an open quote: the command goes on on the next line
        return True
    return False


def _json_objects(text: str) -> list[object] | None:
    """The JSON values of ``text`` one after the other (``jq`` output), or None when it is not JSON."""
    decoder = json.JSONDecoder()
    out: list[object] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        out.append(value)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out or None


def check_output(where: str, cmd: Command, rc: int, actual: str) -> None:
    """A console command's result against what the docs show for it (see the module docstring)."""
    shows_error = bool(EXPECTED_ERROR.search(cmd.documented))
    head = f"{where}: `{cmd.text.strip()}`"
    if rc != 0 and not shows_error:
        raise DocsError(f"{head} exited {rc}:\n{actual[-3000:]}")
    if PROBLEM in actual and PROBLEM not in cmd.documented:
        raise DocsError(f"{head} answered a problem the docs do not show:\n{actual[-3000:]}")
    documented = _json_objects(cmd.documented)
    if documented is None or not all(isinstance(d, dict) for d in documented):
        return
    got = _json_objects(actual)
    if got is None or len(got) != len(documented) or not all(isinstance(g, dict) for g in got):
        raise DocsError(f"{head} printed something else than the docs' JSON:\n{actual[-3000:]}")
    for d, g in zip(documented, got, strict=True):
        assert isinstance(d, dict) and isinstance(g, dict)
        if set(d) != set(g):
            raise DocsError(
                f"{head}: the docs show keys {sorted(d)}, the command printed {sorted(g)}:\n{actual[-3000:]}"
            )
        if str(d.get("type", "")).startswith(PROBLEM) and (d["type"], d.get("status")) != (
            g["type"],
            g.get("status"),
        ):
            raise DocsError(
                f"{head}: the docs show the problem {d['type']}, the command answered:\n{actual[-3000:]}"
            )


# The state a block leaves for the next one of its document: its new shell variables and its directory.
_SAVE_STATE = r"""
__docs_save() {
  local n
  for n in $(compgen -v); do
    case " $__docs_base " in *" $n "*) continue ;; esac
    case "$n" in __docs_*|BASH*|PIPESTATUS|FUNCNAME|OLDPWD|_) continue ;; esac
    declare -p "$n" 2>/dev/null | grep -v '^declare -[a-zA-Z]*r' || true
  done > "$__docs_dir/state.sh"
  pwd > "$__docs_dir/cwd"
}
"""

# curl fails on an HTTP error unless the block already chose how (-f, --fail, --fail-with-body).
_CURL_FAILS = r"""
curl() {
  local a
  for a in "$@"; do
    [[ $a =~ ^-[a-zA-Z]*f[a-zA-Z]*$ || $a == --fail* ]] && { command curl "$@"; return; }
  done
  command curl --fail-with-body "$@"
}
"""


@dataclass
class DocRun:
    """Runs one document's blocks in order (see the module docstring); ``stop()`` ends what they left."""

    workdir: Path
    env: Mapping[str, str]
    substitutions: Iterable[tuple[str, str]] = ()
    timeout: float = 120.0
    repo: Path | None = None
    groups: list[int] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state = self.workdir.parent / (self.workdir.name + ".docs-test")
        self.state.mkdir(exist_ok=True)
        (self.state / "cwd").write_text(str(self.workdir))
        # `.venv/bin/...`, `protos`, `scripts/...` resolve as from the repository root.
        if self.repo is not None:
            for entry in self.repo.iterdir():
                if entry.name not in {".git"} and not (self.workdir / entry.name).exists():
                    (self.workdir / entry.name).symlink_to(entry)

    def substitute(self, text: str) -> str:
        for old, new in self.substitutions:
            text = text.replace(old, new)
        return text

    def _script(self, body: str) -> str:
        return (
            f"__docs_dir={shlex.quote(str(self.state))}\n"
            '__docs_base="$(compgen -v | tr "\\n" " ")"\n'
            f"{_SAVE_STATE}"
            'cd "$(cat "$__docs_dir/cwd")"\n'
            '[ -f "$__docs_dir/state.sh" ] && source "$__docs_dir/state.sh"\n'
            "set -o pipefail\n"
            f"{body}\n"
            "__docs_save\n"
        )

    def _bash(self, script: str, log: Path) -> tuple[int, str]:
        path = self.state / "block.sh"
        path.write_text(script)
        with open(log, "wb") as fh:
            # A session of its own: what the block leaves in the background is one process group to stop.
            proc = subprocess.Popen(
                ["bash", str(path)], env=dict(self.env), stdin=subprocess.DEVNULL, stdout=fh,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.groups.append(proc.pid)
        try:
            rc = proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc.pid)
            proc.wait(10)
            rc = -1
        return rc, log.read_text(errors="replace")

    def run(self, block: Block) -> None:
        """Run one block; raises DocsError with the block's place and output when it fails."""
        n, started = len(self.ran), time.monotonic()
        log = self.state / f"block-{n}.log"
        text = self.substitute(block.text)
        if block.lang != "console":
            rc, out = self._bash(self._script("set -e\n" + _CURL_FAILS + text + "\nset +e"), log)
            if rc != 0:
                why = f"timed out after {self.timeout:.0f} s" if rc == -1 else f"exited {rc}"
                raise DocsError(
                    f"{block.where} ({block.lang} block) {why}:\n{text}\n--- output:\n{out[-4000:]}"
                )
        else:
            commands = console_commands(text)
            parts = []
            for i, cmd in enumerate(commands):
                # A newline before each marker: the output before it may not end in one.
                parts.append(
                    f'printf "\\n@@docs-test {i} begin\\n"\n{cmd.text}\n__docs_rc=$?\n'
                    f'printf "\\n@@docs-test {i} rc=%s\\n" "$__docs_rc"'
                )
                if not EXPECTED_ERROR.search(cmd.documented):
                    parts.append('[ "$__docs_rc" = 0 ] || { __docs_save; exit "$__docs_rc"; }')
            rc, out = self._bash(self._script("\n".join(parts)), log)
            if rc == -1:
                raise DocsError(
                    f"{block.where} (console block) timed out after {self.timeout:.0f} s:\n{out[-4000:]}"
                )
            pieces = re.split(r"^@@docs-test (\d+) begin\n", out, flags=re.M)
            results: dict[int, str] = {int(pieces[k]): pieces[k + 1] for k in range(1, len(pieces) - 1, 2)}
            for i, cmd in enumerate(commands):
                if i not in results:
                    raise DocsError(f"{block.where}: `{cmd.text.strip()}` did not run:\n{out[-4000:]}")
                m = re.search(rf"^@@docs-test {i} rc=(\d+)\s*\Z", results[i], flags=re.M)
                if not m:
                    raise DocsError(
                        f"{block.where}: `{cmd.text.strip()}` did not finish:\n{results[i][-4000:]}"
                    )
                check_output(block.where, cmd, int(m[1]), results[i][: m.start()])
        self.ran.append(f"{block.where} ({time.monotonic() - started:.0f} s)")

    def _kill(self, pgid: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.killpg(pgid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.2)

    def stop(self) -> None:
        """Stop what the blocks left running (servers started with ``&``), by process group."""
        for pgid in self.groups:
            self._kill(pgid)
        self.groups.clear()
