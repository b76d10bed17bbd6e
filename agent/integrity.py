"""Integrity checks the loop runs on the fixed side, before any candidate code runs
(bench/INTEGRITY.md lists every check by name):

- `fixed-hash` (`fixed_hashes` / `changed_fixed`): the sha256 of every tracked file outside
  the research surface, taken at session start and checked in the worktree before every
  benchmark run, so an edited benchmark never runs.
- `diff-scan:<rule>` (`scan_diff`): a static scan of the lines a candidate's diff adds to
  surface Python files, for imports and calls that have no business in a model: timers,
  tracing, process and environment tricks, file reads, imports of the harness, global
  seeding. Advisory: the sandbox is what makes them harmless; the scan refuses them early.

The checks inside the harness itself (restored state after warmup, twin rows, frozen
signals) are in train.py and bench/. What this module must never do: import or run the
candidate's code (it reads its text).
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.workspace import git, parse_diff
from bench.surface import in_surface

# -- fixed-hash: the hashes of the fixed files ---------------------------------------------


def tracked(worktree: Path) -> list[str]:
    """The files git tracks in `worktree`, by path."""
    return [p for p in git(worktree, "ls-files", "-z").split("\0") if p]


def _digest(path: Path) -> str:
    if path.is_symlink():  # a link is its target, not what it points at
        return "symlink:" + hashlib.sha256(os.readlink(path).encode()).hexdigest()
    if not path.is_file():
        return "missing"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fixed_hashes(worktree: Path) -> dict[str, str]:
    """{path: sha256} of every tracked file outside the research surface, as it is on disk
    in `worktree` (the working copy, not the index: a file changed but not committed counts).
    """
    worktree = Path(worktree)
    return {p: _digest(worktree / p) for p in tracked(worktree) if not in_surface(p)}


def changed_fixed(worktree: Path, expected: Mapping[str, str]) -> list[str]:
    """The fixed paths that differ in `worktree` from `expected` (a `fixed_hashes` result):
    changed, missing, or tracked now and not then; sorted, empty when all is as it was."""
    now = fixed_hashes(worktree)
    return sorted(p for p in set(now) | set(expected) if now.get(p) != expected.get(p))


# -- diff-scan: the static scan of a candidate's diff --------------------------------------


@dataclass(frozen=True)
class Rule:
    name: str
    why: str  # why it has no business in a model: shown in the refusal
    modules: tuple[str, ...] = ()  # importing these (or a submodule), or using their names
    names: tuple[str, ...] = ()  # dotted names (after import aliases) used on an added line
    calls: tuple[str, ...] = ()  # builtins called by their bare name
    methods: tuple[str, ...] = ()  # any call of a method with this name (x.read_text())
    regex: str = ""  # the fallback, on added lines of a file that does not parse


# The one list of rules. Each says, in `why`, why surface code has no business doing it.
SCAN_RULES: tuple[Rule, ...] = (
    # The harness owns the clock; a model never needs to know the time.
    Rule("clock", "reads or patches the clock, which the harness owns",
         modules=("time", "datetime", "timeit"),
         regex=r"^\s*import\s+(time|datetime|timeit)\b|^\s*from\s+(time|datetime|timeit)\s+import"
               r"|\btime\.\w+|\bperf_counter\b|\bmonotonic\b"),
    # Syncs and events are the harness's timing instruments.
    Rule("cuda-timing", "uses the harness's timing instruments (CUDA syncs and events)",
         names=("torch.cuda.synchronize", "torch.cuda.Event", "torch.cuda.Event.elapsed_time"),
         regex=r"\bcuda\.(synchronize|Event)\b"),
    # Pausing the collector moves its cost out of the clock or into evaluation.
    Rule("gc", "controls the garbage collector", modules=("gc",),
         regex=r"^\s*import\s+gc\b|\bgc\.\w+"),
    # Tracing and profiling hooks can watch or rewrite the harness's frames.
    Rule("tracing", "installs trace or profile hooks",
         names=("sys.settrace", "sys.setprofile", "threading.settrace", "threading.setprofile",
                "sys.monitoring"),
         regex=r"\b(settrace|setprofile)\b|\bsys\.monitoring\b"),
    # The module table is how one patches the harness or its imports from afar.
    Rule("sys-modules", "reads or patches the module table", names=("sys.modules",),
         regex=r"\bsys\.modules\b"),
    # Patching builtins or the main module changes the harness itself.
    Rule("builtins", "touches builtins or the __main__ module (the harness)",
         modules=("builtins", "__main__"), names=("__builtins__",),
         regex=r"\b(builtins|__builtins__|__main__)\b"),
    # Exit hooks and signal handlers run after the harness's checks, or interrupt its clock.
    Rule("exit-hooks", "registers exit hooks or signal handlers", modules=("atexit", "signal"),
         regex=r"^\s*import\s+(atexit|signal)\b|\b(atexit|signal)\.\w+"),
    # Raw memory access can rewrite anything, the harness's variables included.
    Rule("ctypes", "uses ctypes or cffi (raw memory and C calls)", modules=("ctypes", "cffi"),
         regex=r"\b(ctypes|cffi)\b"),
    # The environment configures the harness, torch and the child processes.
    Rule("env-write", "writes the process environment",
         names=("os.putenv", "os.unsetenv"),
         regex=r"\benviron\s*\[[^\]]*\]\s*=(?!=)|\benviron\.(update|setdefault|pop|clear)\b"
               r"|\b(putenv|unsetenv)\b|\bdel\s+os\.environ\b"),
    # Other processes escape the harness, its clock and the runner's supervision.
    Rule("subprocess", "starts other processes",
         modules=("subprocess", "pty"),
         names=("os.system", "os.popen", "os.fork", "os.forkpty", "os.kill", "os.killpg",
                *(f"os.exec{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
                *(f"os.spawn{s}" for s in ("l", "le", "lp", "lpe", "v", "ve", "vp", "vpe")),
                "os.posix_spawn", "os.posix_spawnp"),
         regex=r"\bsubprocess\b|\bos\.(system|popen|fork|exec\w*|spawn\w*|posix_spawn\w*|kill)\b"),
    # Work on other threads or processes runs outside what the harness synchronises.
    Rule("threads", "starts threads or processes",
         modules=("threading", "_thread", "multiprocessing", "concurrent", "asyncio"),
         names=("torch.multiprocessing",),
         regex=r"\b(threading|_thread|multiprocessing|concurrent\.futures|asyncio)\b"),
    # A model has nothing to fetch or report over a network.
    Rule("network", "opens network connections",
         modules=("socket", "ssl", "http", "urllib", "requests", "ftplib", "smtplib"),
         regex=r"\b(socket|urllib|requests|http\.client|ssl)\b"),
    # Introspection finds and patches the harness's frames and functions.
    Rule("inspect", "introspects the caller (the harness)", modules=("inspect", "traceback"),
         names=("sys._getframe", "sys._current_frames"),
         regex=r"^\s*import\s+(inspect|traceback)\b|\binspect\.\w+|\b_getframe\b"),
    # Reads and writes of files: the validation data, cached results, the harness.
    Rule("file-io", "opens or reads files (the surface is given its data by the harness)",
         names=("io.open", "os.open", "torch.load", "torch.save", "numpy.load",
                "numpy.fromfile", "numpy.memmap", "numpy.save"),
         calls=("open",),
         methods=("read_text", "read_bytes", "write_text", "write_bytes", "open"),
         regex=r"\bopen\s*\(|\.(read_text|read_bytes|write_text|write_bytes)\s*\("
               r"|\b(torch|np|numpy)\.(load|save|fromfile|memmap)\b"),
    # Dynamic imports and code execution hide any of the above from a static scan.
    Rule("dynamic-code", "imports or runs code dynamically (hides it from this scan)",
         modules=("importlib", "runpy"), calls=("__import__", "exec", "eval"),
         regex=r"\bimportlib\b|\brunpy\b|\b__import__\b|\bexec\s*\(|\beval\s*\("),
    # The surface is called by the harness, never the other way round.
    Rule("harness-import", "imports the fixed benchmark (train, bench, data, agent)",
         modules=("train", "bench", "data", "agent"),
         regex=r"^\s*(from|import)\s+(train|bench|data|agent)\b"),
    # The judge chooses the seeds; a global seed in the surface picks a lucky one.
    Rule("global-seed", "sets a global random seed or RNG state (the judge chooses seeds)",
         names=("torch.manual_seed", "torch.seed", "torch.random.manual_seed",
                "torch.random.seed", "torch.set_rng_state", "torch.random.set_rng_state",
                "torch.cuda.manual_seed", "torch.cuda.manual_seed_all", "torch.cuda.seed",
                "torch.cuda.seed_all", "torch.cuda.set_rng_state",
                "torch.cuda.set_rng_state_all", "random.seed", "random.setstate",
                "numpy.random.seed", "numpy.random.set_state"),
         regex=r"\b(manual_seed|manual_seed_all|set_rng_state|setstate|set_state)\s*\("
               r"|\brandom\.seed\s*\(|\btorch\.(cuda\.)?seed\s*\("),
)  # fmt: skip

RULES_BY_NAME = {rule.name: rule for rule in SCAN_RULES}


@dataclass(frozen=True)
class Finding:
    path: str
    line: int  # in the file at the candidate's commit
    rule: str  # a name in SCAN_RULES
    text: str  # the added line, stripped

    def __str__(self) -> str:
        why = RULES_BY_NAME[self.rule].why
        return f"{self.path}:{self.line}: {self.rule} ({why}): {self.text[:120]}"


SourceFn = Callable[[str], "str | None"]  # path -> the file's text at the candidate commit


def added_lines(diff: str) -> dict[str, dict[int, str]]:
    """{path: {line number in the new file: text}} of the lines a diff adds."""
    return {f.path: f.added for f in parse_diff(diff) if f.path and f.added}


def scan_diff(diff: str, source: SourceFn | None = None) -> list[Finding]:
    """Findings on the lines `diff` adds to surface Python files, sorted by path and line.

    With `source` (the new text of a path), each file is parsed and its syntax tree checked
    (import aliases resolved); a file that does not parse, or has no source, falls back to
    the rules' regexes on the added lines alone.
    """
    findings: set[Finding] = set()
    for path, lines in added_lines(diff).items():
        if not in_surface(path) or not path.endswith(".py"):
            continue
        text = source(path) if source is not None else None
        tree = None
        if text is not None:
            try:
                tree = ast.parse(text)
            except (SyntaxError, ValueError):
                tree = None
        if tree is not None:
            for rule, first, last in _ast_hits(tree):
                for n in range(first, last + 1):
                    if n in lines:
                        findings.add(Finding(path, n, rule, lines[n].strip()))
                        break
        else:
            for n, line in lines.items():
                for rule in SCAN_RULES:
                    if rule.regex and re.search(rule.regex, line):
                        findings.add(Finding(path, n, rule.name, line.strip()))
    return sorted(findings, key=lambda f: (f.path, f.line, f.rule))


def describe(findings: list[Finding]) -> str:
    """The refusal reason: every finding on its own line."""
    head = f"the integrity scan flagged {len(findings)} added line(s) of the surface:"
    return "\n".join([head, *(f"  {f}" for f in findings)])


def _matches(dotted: str, rule: Rule) -> bool:
    if any(dotted == m or dotted.startswith(m + ".") for m in rule.modules):
        return True
    return any(dotted == n or dotted.startswith(n + ".") for n in rule.names)


def _rules_for(dotted: str) -> list[str]:
    return [rule.name for rule in SCAN_RULES if _matches(dotted, rule)]


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it stands for, from every import in the file."""
    names = {"np": "numpy"}  # the usual alias, even when the import is elsewhere
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    names.setdefault(a.name.split(".")[0], a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


UNIMPORTED = ("__builtins__",)  # names that reach the harness without an import


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    if node.id not in aliases and node.id not in UNIMPORTED:
        return None  # a local variable that happens to be called `time` or `data`
    head = aliases.get(node.id, node.id)
    return ".".join([head, *reversed(parts)])


ENV_MUTATORS = ("update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__")


def _ast_hits(tree: ast.AST) -> list[tuple[str, int, int]]:
    """(rule, first line, last line) for every node of the tree that a rule flags."""
    aliases = _aliases(tree)
    hits: list[tuple[str, int, int]] = []

    def hit(rule: str, node: ast.AST) -> None:
        hits.append((rule, node.lineno, getattr(node, "end_lineno", None) or node.lineno))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                for rule in _rules_for(a.name):
                    hit(rule, node)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                for rule in set(_rules_for(node.module)) | set(_rules_for(full)):
                    hit(rule, node)
        elif isinstance(node, (ast.Attribute, ast.Name)) and not isinstance(
            getattr(node, "ctx", None), ast.Del
        ):
            # Only the outermost attribute chain of a name (time.perf_counter, not time).
            dotted = _dotted(node, aliases)
            if dotted is not None:
                for rule in _rules_for(dotted):
                    hit(rule, node)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id not in aliases:
                for rule in SCAN_RULES:
                    if func.id in rule.calls:
                        hit(rule.name, node)
            if isinstance(func, ast.Attribute):
                for rule in SCAN_RULES:
                    if func.attr in rule.methods:
                        hit(rule.name, node)
                owner = _dotted(func.value, aliases)
                if owner == "os.environ" and func.attr in ENV_MUTATORS:
                    hit("env-write", node)
        targets: list[ast.AST] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            base = target.value if isinstance(target, ast.Subscript) else target
            if _dotted(base, aliases) == "os.environ":
                hit("env-write", target)
    return hits
