"""A fast stand-in for the benchmark, for tests that run many whole sessions.

`fake_harness_repo(dest)` is this working tree as a fresh repository whose fixed harness is
replaced by small fakes: train.py honours the harness's contract (bench/protocol.py: the
result JSON on stdout and in --out, a checkpoint, exit 2 with "error: ..." on bad input)
in a fraction of a second; bench/score.py and bench/profile.py answer the loop's
acceptance check and profile the same way. Everything else is real: the engine runs them
through the real runner, as child processes, under the device lock, in the session's own
worktree.

The fake's speed is the product of the numbers in model/speed*.txt (tokens per second =
1000 x speed: model/speed.txt, and others a candidate adds beside it, so that changes of
different files compose), its noise 1% a run, drawn from the seed; so a session on it
decides the same way every time it is run. model/delay.txt, when a candidate adds it, is
how many seconds each of its runs takes.
"""

from __future__ import annotations

from pathlib import Path

from fakes.repo import git, working_tree_repo

TRAIN = '''\
"""A fake train.py (tests/fakes/harness.py): train.py's result contract in milliseconds."""
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from bench.protocol import SCHEMA_VERSION, eval_line, train_line

# What the engine reads of the harness: each preset's device, default data and target.
PRESETS = {"cpu-tiny": SimpleNamespace(device="cpu", data="embedded", target_loss=None)}


def flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def main(argv):
    t0 = time.perf_counter()
    if flag(argv, "--data") == "missing":
        print("error: dataset 'missing' is not prepared", file=sys.stderr)
        return 2
    seed = int(flag(argv, "--seed", 0))
    rng = random.Random(seed)
    speed = math.prod(float(p.read_text()) for p in Path("model").glob("speed*.txt"))
    if Path("model/delay.txt").is_file():
        time.sleep(float(Path("model/delay.txt").read_text()))
    loss = 5.0 + 0.002 * rng.gauss(0, 1)
    startup = time.perf_counter() - t0
    print("clock start", flush=True)
    for step in (1, 2):  # the progress lines of train.py, for whoever watches them
        time.sleep(0.005)
        print(train_line(step, 2048 * step, loss + 1 / step, 0.005 * step), flush=True)
    print("clock pause", flush=True)
    print(eval_line(2, 4096, loss, 0.01), flush=True)
    result = {
        "schema_version": SCHEMA_VERSION, "status": "ok", "sandbox": "--no-sandbox" not in argv,
        "preset": flag(argv, "--preset"), "seed": seed,
        "tokens": 4096, "tokens_per_sec": 1000.0 * speed * (1 + 0.01 * rng.gauss(0, 1)),
        "train_seconds": 0.01, "val_loss": loss, "time_to_target": None,
        "untimed": {"startup": startup, "evaluation": 0.0, "other": 0.0},
        "curve": [{"tokens": 4096, "seconds": 0.01, "val_loss": loss}],
    }
    # FAKE_DISTURBED: a file holding how many of the next runs wait for a CPU half their
    # timed seconds (as if a neighbour took their core); each such run counts one down.
    disturb = Path(os.environ.get("FAKE_DISTURBED", "/nonexistent"))
    if disturb.is_file() and int(disturb.read_text()) > 0:
        disturb.write_text(str(int(disturb.read_text()) - 1))
        result["cpu_usage"] = {"run_delay_seconds": 0.005, "steal_seconds": 0.0}
    if flag(argv, "--checkpoint"):
        Path(flag(argv, "--checkpoint")).write_text(json.dumps({"val_loss": loss, "seed": seed}))
    if flag(argv, "--out"):
        Path(flag(argv, "--out")).write_text(json.dumps(result))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''

SCORE = '''\
"""A fake scorer (tests/fakes/harness.py): a checkpoint's val loss, and a holdout loss a
seed-dependent gap above it."""
import json
import random
import sys
from pathlib import Path

VALUED = ("--preset", "--device", "--data", "--kernels", "--splits")
args = sys.argv[1:]
paths = [a for i, a in enumerate(args)
         if not a.startswith("--") and (i == 0 or args[i - 1] not in VALUED)]
rows = []
for path in paths:
    saved = json.loads(Path(path).read_text())
    gap = 0.1 + 0.01 * random.Random(saved["seed"]).gauss(0, 1)
    rows.append({"checkpoint": path,
                 "val": {"loss": saved["val_loss"], "bpb": None, "twins_ok": True},
                 "holdout": {"loss": saved["val_loss"] + gap, "bpb": None, "twins_ok": True}})
print(json.dumps(rows))
'''

PROFILE = '''\
"""A fake profile (tests/fakes/harness.py)."""
import sys
from pathlib import Path

Path(sys.argv[sys.argv.index("--out") + 1]).write_text("profile of the fake harness\\n")
'''


def fake_harness_repo(dest: Path) -> Path:
    """This working tree at `dest`, committed, with the fake harness committed on top."""
    working_tree_repo(dest)
    (dest / "train.py").write_text(TRAIN)
    (dest / "bench" / "score.py").write_text(SCORE)
    (dest / "bench" / "profile.py").write_text(PROFILE)
    (dest / "model" / "speed.txt").write_text("1.0\n")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "the fake harness")
    return dest


def patch_of(repo: Path, edits: dict[str, str]) -> str:
    """The diff that writes `edits` ({path: new text}) into the repository's HEAD, as a
    patch file would hold it; the working tree is left as it was."""
    for path, text in edits.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git(repo, "add", "-A")
    diff = git(repo, "diff", "--cached", "--no-color")
    git(repo, "reset", "-q", "--hard", "HEAD")
    return diff
