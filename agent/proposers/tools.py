"""The tools an LLM proposer uses on a candidate's worktree, confined to the research surface.

Every path a tool takes is checked against bench/surface.py (symlinks resolved), so the model
can neither read nor write the fixed benchmark. Edits are all-or-nothing: a snippet must
match exactly once, a Python file must still parse, and a file is replaced atomically
(written beside it, then renamed), so a failed tool call changes nothing. Every edit is
journalled, and `restore` puts the touched files back when a conversation fails. The
quick checks (agent/proposers/checks.py) run the edited surface in a child process with a
timeout, never in this one.
A failure comes back as a ToolError whose message tells the model what to fix.
"""

from __future__ import annotations

import inspect
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.context import digest_line
from agent.proposers.base import CATEGORIES
from agent.proposers.checks import CheckFailed, CheckSettings, quick_checks
from agent.workspace import current_diff, normalized
from bench.surface import SURFACE_DIRS, in_surface

MAX_READ_LINES = 400  # lines per read_file answer; the model pages with start_line
MAX_MATCHES = 60  # search_surface answers
SKIP_DIRS = {"__pycache__", ".pytest_cache"}

class ToolError(Exception):
    """A tool call the model must correct; the message says how."""


@dataclass
class Submission:
    description: str
    hypothesis: str
    expected_effect: str
    category: str


TOOL_SPECS = [
    {
        "name": "list_files",
        "description": "List the files of the research surface (model/, kernels/) with their "
        "line counts. `path` narrows it to one directory.",
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string", "description": "e.g. 'kernels'"}},
        },
    },
    {
        "name": "read_file",
        "description": f"Read a surface file with line numbers, at most {MAX_READ_LINES} "
        "lines per call; use start_line/end_line (1-based, inclusive) to page.",
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "e.g. 'model/gpt.py'"},
                "start_line": {"type": "integer", "minimum": 1},
                "end_line": {"type": "integer", "minimum": 1},
            },
            "required": ["path"],
        },
    },
    {
        "name": "search_surface",
        "description": "Find lines in the surface files that contain `pattern` (plain text, "
        "or a Python regular expression with regex=true). `path` narrows the search.",
        "input_schema": {
            "type": "object",
            "properties": {
                "pattern": {"type": "string"},
                "regex": {"type": "boolean", "default": False},
                "path": {"type": "string"},
            },
            "required": ["pattern"],
        },
    },
    {
        "name": "replace_in_file",
        "description": "Replace the exact text `old` with `new` in a surface file. `old` must "
        "occur exactly once, whitespace and indentation included: copy it from read_file "
        "(without the line-number prefixes) with enough lines to be unique. A Python file "
        "must still parse, else nothing is written.",
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "old": {"type": "string"},
                "new": {"type": "string"},
            },
            "required": ["path", "old", "new"],
        },
    },
    {
        "name": "create_file",
        "description": "Create a new file under model/ or kernels/ (not an existing one: "
        "edit those with replace_in_file).",
        "input_schema": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"],
        },
    },
    {
        "name": "run_checks",
        "description": "Run the quick checks on the edited surface: two CPU train steps of the "
        "cpu-tiny recipe, the causality probe, and the session preset's recipe built on the "
        "meta device (about 10-30 s). kernel_tests=true also runs the kernel unit tests "
        "(tests/test_kernels_*.py, about 30 s more): do that after editing kernels/.",
        "input_schema": {
            "type": "object",
            "properties": {"kernel_tests": {"type": "boolean", "default": False}},
        },
    },
    {
        "name": "submit",
        "description": "Hand in the edit as this conversation's one candidate; it then runs "
        "on the benchmark. Needs passing run_checks after the last edit. Ends the "
        "conversation.",
        "input_schema": {
            "type": "object",
            "properties": {
                "description": {
                    "type": "string",
                    "description": "one line, at most 100 characters, e.g. 'muon: 6 "
                    "Newton-Schulz steps instead of 5'",
                },
                "hypothesis": {"type": "string", "description": "why it should be faster"},
                "expected_effect": {
                    "type": "string",
                    "description": "e.g. '~5% shorter time to target, same val loss'",
                },
                "category": {"type": "string", "enum": list(CATEGORIES)},
            },
            "required": ["description", "hypothesis", "expected_effect", "category"],
        },
    },
]


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` at once: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def changes(diff: str) -> bool:
    """Whether a diff changes anything but whitespace."""
    return any(not line.startswith("diff --git ") for line in normalized(diff))


def find_duplicate(diff: str, history: list[dict]) -> dict | None:
    """The earliest history row whose diff equals `diff` up to whitespace, if any."""
    key = normalized(diff)
    for row in history:
        if row.get("diff") and normalized(row["diff"]) == key:
            return row
    return None


class SurfaceTools:
    """The tools of one conversation on `worktree`; `history` is the session's candidates."""

    def __init__(self, worktree: Path, history: list[dict], preset: str,
                 checks: CheckSettings | None = None):
        self.root = Path(worktree).resolve()
        self.history = history
        self.preset = preset
        self.checks = checks or CheckSettings()
        self.originals: dict[Path, str | None] = {}  # file -> text before the first edit
        self.edits = 0
        self.checked_at: int | None = None  # self.edits when the checks last passed

    # -- dispatch ------------------------------------------------------------------------

    def call(self, name: str, args: dict) -> str | Submission:
        """Run tool `name`; its text answer, or the Submission. ToolError: a bad call."""
        method = getattr(self, f"tool_{name}", None)
        if method is None:
            raise ToolError(f"there is no tool '{name}'; use one of "
                            f"{', '.join(t['name'] for t in TOOL_SPECS)}")
        try:
            inspect.signature(method).bind(**args)
        except TypeError as e:  # missing or unknown arguments
            raise ToolError(f"bad arguments for {name}: {e}") from None
        return method(**args)

    # -- paths ---------------------------------------------------------------------------

    def resolve(self, path: str, kind: str = "file") -> Path:
        """The absolute path of a surface path; ToolError for anything outside the surface."""
        rel = PurePosixPath(str(path).strip().removeprefix("./").rstrip("/"))
        allowed = ", ".join(f"{d}/" for d in SURFACE_DIRS)
        inside = in_surface(str(rel)) or (kind == "dir" and str(rel) in SURFACE_DIRS)
        if not inside:
            raise ToolError(f"'{path}' is outside the research surface: only paths under "
                            f"{allowed} can be used (relative to the repository root)")
        full = (self.root / rel).resolve()
        top = (self.root / rel.parts[0]).resolve()
        if full != top and top not in full.parents:
            raise ToolError(f"'{path}' leads outside the research surface (a symlink?)")
        return full

    def relative(self, full: Path) -> str:
        return full.relative_to(self.root).as_posix()

    def surface_files(self, under: Path | None = None) -> list[Path]:
        tops = [under] if under else [self.root / d for d in SURFACE_DIRS]
        files = []
        for top in tops:
            if top.is_file():
                files.append(top)
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(d for d in dirnames
                                     if d not in SKIP_DIRS and not d.startswith("."))
                files += [Path(dirpath) / f for f in sorted(filenames)
                          if not f.startswith(".") and not f.endswith(".pyc")]
        return files

    def read_text(self, full: Path) -> str:
        if not full.is_file():
            raise ToolError(f"{self.relative(full)} does not exist; list_files shows what does")
        try:
            return full.read_text()
        except UnicodeDecodeError:
            raise ToolError(f"{self.relative(full)} is not a text file") from None

    # -- reading -------------------------------------------------------------------------

    def tool_list_files(self, path: str | None = None) -> str:
        under = self.resolve(path, kind="dir") if path else None
        if under is not None and not under.exists():
            raise ToolError(f"{path} does not exist")
        lines = []
        for f in self.surface_files(under):
            try:
                size = f"{len(f.read_text().splitlines())} lines"
            except UnicodeDecodeError:
                size = "binary"
            lines.append(f"{self.relative(f)}  ({size})")
        return "\n".join(lines) or "(no files)"

    def tool_read_file(self, path: str, start_line: int = 1, end_line: int | None = None) -> str:
        full = self.resolve(path)
        lines = self.read_text(full).splitlines()
        n = len(lines)
        start = max(1, int(start_line))
        if n and start > n:
            raise ToolError(f"{path} has {n} lines; start_line {start} is past its end")
        end = min(n, int(end_line) if end_line else n, start + MAX_READ_LINES - 1)
        if end < start and n:
            raise ToolError(f"end_line {end_line} is before start_line {start}")
        body = "\n".join(f"{i:5d}| {lines[i - 1]}" for i in range(start, end + 1))
        note = f"{path}: lines {start}-{end} of {n}"
        if end < n:
            note += f" (next: start_line={end + 1})"
        return f"{note}\n{body}"

    def tool_search_surface(self, pattern: str, regex: bool = False,
                            path: str | None = None) -> str:
        if not pattern:
            raise ToolError("pattern is empty")
        try:
            matcher = re.compile(pattern if regex else re.escape(pattern))
        except re.error as e:
            raise ToolError(f"bad regular expression {pattern!r}: {e}") from None
        under = self.resolve(path, kind="dir") if path else None
        hits = []
        for f in self.surface_files(under):
            try:
                text = f.read_text()
            except UnicodeDecodeError:
                continue
            for i, line in enumerate(text.splitlines(), 1):
                if matcher.search(line):
                    hits.append(f"{self.relative(f)}:{i}: {line.strip()[:200]}")
        if not hits:
            return f"no line matches {pattern!r}"
        more = f"\n... {len(hits) - MAX_MATCHES} more; narrow the search" \
            if len(hits) > MAX_MATCHES else ""
        return "\n".join(hits[:MAX_MATCHES]) + more

    # -- editing -------------------------------------------------------------------------

    def write(self, full: Path, text: str) -> None:
        """The one way files change: syntax-checked, journalled, atomic."""
        if full.suffix == ".py":
            try:
                compile(text, self.relative(full), "exec")
            except SyntaxError as e:
                raise ToolError(f"the edit would leave {self.relative(full)} with a syntax "
                                f"error at line {e.lineno}: {e.msg}; nothing was written") from None
        if full not in self.originals:
            self.originals[full] = full.read_text() if full.exists() else None
        write_atomic(full, text)
        self.edits += 1

    def tool_replace_in_file(self, path: str, old: str, new: str) -> str:
        full = self.resolve(path)
        text = self.read_text(full)
        if not old:
            raise ToolError("`old` is empty: give the exact text to replace")
        if old == new:
            raise ToolError("`old` and `new` are the same: nothing would change")
        count = text.count(old)
        if count == 0:
            raise ToolError(f"`old` does not occur in {path}; nothing was written. "
                            + self._near_miss(text, old))
        if count > 1:
            starts = [text.count("\n", 0, m.start()) + 1
                      for m in re.finditer(re.escape(old), text)]
            raise ToolError(f"`old` occurs {count} times in {path} (at lines "
                            f"{', '.join(map(str, starts))}); add surrounding lines so it "
                            "matches once. Nothing was written.")
        line = text.count("\n", 0, text.index(old)) + 1
        self.write(full, text.replace(old, new, 1))
        return f"replaced {len(old.splitlines())} line(s) at line {line} of {path}"

    @staticmethod
    def _near_miss(text: str, old: str) -> str:
        first = next((s.strip() for s in old.splitlines() if s.strip()), "")
        lines = [i for i, s in enumerate(text.splitlines(), 1) if first and first in s]
        if lines:
            return (f"Its first line appears at line(s) {', '.join(map(str, lines[:5]))}: read "
                    "them again and copy the text exactly (indentation, blank lines, quotes), "
                    "without the line-number prefixes.")
        return "Read the file again (read_file) and copy the text exactly."

    def tool_create_file(self, path: str, content: str) -> str:
        full = self.resolve(path)
        if full.exists():
            raise ToolError(f"{path} exists already: change it with replace_in_file")
        self.write(full, content)
        return f"created {path} ({len(content.splitlines())} lines)"

    def restore(self) -> None:
        """Put every file this conversation touched back as it was; remove created ones."""
        for full, text in self.originals.items():
            if text is None:
                full.unlink(missing_ok=True)
            else:
                write_atomic(full, text)
        self.originals.clear()

    # -- checking and submitting -----------------------------------------------------------

    def tool_run_checks(self, kernel_tests: bool = False) -> str:
        try:
            report = quick_checks(self.root, self.preset, self.checks, kernel_tests)
        except CheckFailed as e:
            raise ToolError(str(e)) from None
        self.checked_at = self.edits
        return report

    def tool_submit(self, description: str, hypothesis: str, expected_effect: str,
                    category: str) -> Submission:
        description = description.strip()
        if not description or "\n" in description or len(description) > 120:
            raise ToolError("description must be one line of at most 120 characters")
        if category not in CATEGORIES:
            raise ToolError(f"category '{category}': choose one of {', '.join(CATEGORIES)}")
        diff = current_diff(self.root)
        if not diff.strip():
            raise ToolError("nothing is changed yet: edit the surface before submitting")
        if not changes(diff):
            raise ToolError("the change is whitespace only: it cannot make training faster")
        if self.checks.require_checks and self.checked_at != self.edits:
            raise ToolError("run run_checks after your last edit, and submit when it passes")
        twin = find_duplicate(diff, self.history)
        if twin is not None:
            raise ToolError(f"this exact change was tried already: {digest_line(twin)}; "
                            "try something else")
        return Submission(description, hypothesis.strip(), expected_effect.strip(), category)
