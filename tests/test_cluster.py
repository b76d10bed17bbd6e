"""The Ray backend (`--cluster ray`): whole sessions whose slots are Ray actors of one local
Ray instance (two CPUs, shared by the module: starting Ray is slow), on the fast fake
harness (tests/fakes/harness.py). The node has a data cache and locks of its own, as a
node of a real cluster would. Also: a node without the head's dataset, a worker killed
mid-run, the prepare helper on every node, and `--cluster ray` without Ray installed."""

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from fakes.harness import patch_of

from agent.cli import main
from agent.config import SessionConfig, SessionStop
from agent.loop import Session
from agent.proposers import make_proposer
from agent.status import status_text

ray = pytest.importorskip("ray")  # the `cluster` extra; `make test` installs it


@pytest.fixture(scope="module")
def node(data_cache, tmp_path_factory) -> Path:
    """A local Ray instance whose one node keeps its data cache (a copy of the embedded
    dataset), its device locks and its runs' folders under the returned folder; its IP is
    in node.ip. Shut down after the module."""
    root = tmp_path_factory.mktemp("ray-node")
    shutil.copytree(data_cache / "embedded", root / "data" / "embedded")
    with pytest.MonkeyPatch.context() as mp:  # what the node's workers inherit
        for name, folder in (("SPEEDLOOP_DATA", "data"), ("SPEEDLOOP_LOCKS", "locks"),
                             ("SPEEDLOOP_SCRATCH", "scratch")):
            mp.setenv(name, str(root / folder))
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    try:
        yield root
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def head(node, monkeypatch, tmp_path):
    """The head reads the node's data (one machine), with locks of its own."""
    monkeypatch.setenv("SPEEDLOOP_DATA", str(node / "data"))
    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(tmp_path / "locks"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def ip() -> str:
    return ray.nodes()[0]["NodeManagerAddress"]


def session(repo: Path, run_dir: Path, edits: list[dict[str, str]]) -> Session:
    """A throughput session of the patches `edits`, on two Ray slots."""
    folder = run_dir.parent / "patches"
    folder.mkdir()
    for n, edit in enumerate(edits):
        (folder / f"{n:02d}.patch").write_text(patch_of(repo, edit))
    config = SessionConfig(repo=str(repo), objective="throughput", baseline_runs=2,
                           proposer="patches", proposer_arg=str(folder), wandb="disabled",
                           cluster="ray", devices="cpu:2")  # fmt: skip
    return Session.create(run_dir, config, make_proposer("patches", str(folder), {}),
                          say=lambda text: None)  # fmt: skip


def test_a_session_runs_on_ray_actors_and_its_files_come_home(fake_repo, tmp_path):
    """Two slots, each an actor pinned to one of the node's cores, named by node: every
    run recorded with its slot, its lock and lines streamed back while it ran, its log on
    the head; the accepted candidate's checkpoints arrived and were scored on the head."""
    s = session(fake_repo, tmp_path / "s", [{"model/speed.txt": "1.3\n"},
                                            {"model/speed_b.txt": "0.8\n"}])
    slots = s.measurer.pool.slots
    assert [slot.name for slot in slots] == [f"{ip()}/cpu0", f"{ip()}/cpu1"]
    assert [slot.remote.where["cores"] for slot in slots] == [(0,), (1,)]
    lines: dict[int, list[str]] = {}  # what W&B's live run is handed, line by line
    s.measurer.tracker.run_line = lambda run, line: lines.setdefault(run, []).append(line)
    s.run()
    runs = [r for c in s.ledger.candidates() for r in s.ledger.runs_of(c["id"])]
    assert {r["slot"] for r in runs} == {slot.name for slot in slots}
    for r in runs:
        assert r["outcome"] == "ok" and r["lock_at"] is not None
        log = Path(r["log_path"]).read_text()
        assert "[runner] $ " in log and "eval   step" in log
        assert any(line.startswith("eval   step") for line in lines[r["id"]])
    faster, slower = s.ledger.candidates()[1:]
    assert (faster["verdict"], slower["verdict"]) == ("accept", "reject")
    mine = s.ledger.runs_of(faster["id"])
    assert set(s.ledger.holdout_of(r["id"] for r in mine)) == {r["id"] for r in mine}
    assert not list((s.run_dir.root / "checkpoints").glob("*.pt"))  # scored, then dropped
    assert f"slot {ip()}/cpu0" in status_text(s.run_dir.root)
    with pytest.raises(ray.exceptions.RayActorError):  # the workers ended with the session
        ray.get(slots[0].remote.actor.where.remote(), timeout=60)


def kill_screens(s: Session, times: int) -> tuple[list[dict], BaseException | None]:
    """Run the session in a thread and kill the actor of each screen run once it runs, up
    to `times` of them; the runs killed, and what the session raised (None: it finished)."""
    slots = {slot.name: slot for slot in s.measurer.pool.slots}
    raised: list[BaseException] = []

    def run() -> None:
        try:
            s.run()
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    killed: list[dict] = []
    deadline = time.monotonic() + 120
    while thread.is_alive() and len(killed) < times and time.monotonic() < deadline:
        for r in s.ledger.running_runs():
            if r["role"] == "screen" and r["lock_at"] and r["id"] not in [k["id"] for k in killed]:
                killed.append(r)
                ray.kill(slots[r["slot"]].remote.actor)
        time.sleep(0.05)
    thread.join(timeout=120)
    assert not thread.is_alive() and len(killed) == times
    return killed, raised[0] if raised else None


def test_a_worker_killed_mid_run_loses_that_run_only(fake_repo, tmp_path):
    """The actor running the candidate's screen is killed: that run is lost (discarded,
    never counted), its slot retired, the run made again on the other slot; the session
    finishes and the candidate is decided once."""
    s = session(fake_repo, tmp_path / "s", [{"model/speed.txt": "0.8\n",
                                             "model/delay.txt": "3\n"}])
    slots = {slot.name: slot for slot in s.measurer.pool.slots}
    (killed,), raised = kill_screens(s, 1)
    assert raised is None
    lost = s.ledger.run(killed["id"])
    assert lost["state"] == "discarded" and lost["error"].startswith("lost: the worker of node")
    assert "killed by `ray.kill`" in Path(lost["log_path"]).read_text()
    other = next(name for name in slots if name != killed["slot"])
    assert s.measurer.pool.names == [other]
    candidate = s.ledger.candidates()[1]
    assert candidate["state"] == "decided" and candidate["verdict"] == "reject"
    assert [(r["slot"], r["outcome"]) for r in s.ledger.runs_of(candidate["id"])] == \
        [(other, "ok")]
    assert any(f"slot {killed['slot']} retired" in e["text"] for e in s.ledger.events())


def test_the_session_stops_when_every_worker_died(fake_repo, tmp_path):
    """Both actors killed, each while it runs the screen: the session stops with one line
    saying so, the candidate undecided; resumed, it runs it on new workers."""
    s = session(fake_repo, tmp_path / "s", [{"model/speed.txt": "0.8\n",
                                             "model/delay.txt": "3\n"}])
    killed, raised = kill_screens(s, 2)
    assert isinstance(raised, SessionStop)
    assert str(raised).startswith("every slot of the session is lost")
    assert {r["slot"] for r in killed} == {f"{ip()}/cpu0", f"{ip()}/cpu1"}
    assert [s.ledger.run(r["id"])["state"] for r in killed] == ["discarded"] * 2
    assert s.ledger.candidates()[1]["state"] == "running"
    assert "stopped: every slot of the session is lost" in status_text(s.run_dir.root)
    resumed = Session(s.run_dir.root, make_proposer("patches", s.config.proposer_arg, {}),
                      say=lambda text: None)
    resumed.run()
    candidate = resumed.ledger.candidates()[1]
    assert candidate["state"] == "decided" and candidate["verdict"] == "reject"
    assert len(resumed.ledger.runs_of(candidate["id"])) == 1


def test_a_node_without_the_heads_dataset_stops_the_session_in_one_line(tmp_path, monkeypatch,
                                                                       capsys):
    """The head's dataset is not the node's (another fingerprint): `run --cluster ray` says
    so in one line naming the node and the commands, exit 2, and leaves no run directory."""
    head = tmp_path / "head-data"
    shutil.copytree(Path(os.environ["SPEEDLOOP_DATA"]) / "embedded",
                    head / "embedded")
    meta = json.loads((head / "embedded" / "meta.json").read_text())
    meta["fingerprint"] = "f" * 64
    (head / "embedded" / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setenv("SPEEDLOOP_DATA", str(head))
    code = main(["run", "--cluster", "ray", "--devices", "cpu:2", "--no-sandbox", "--wandb",
                 "disabled", "--run-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.count(f"node {ip()}:") == 1, err
    assert err.startswith(f"error: node {ip()}: its dataset 'embedded' has fingerprint ")
    assert "the head's ffffffffffff" in err
    assert "run `python -m data prepare embedded --force` there" in err
    assert "`python -m agent cluster prepare embedded --force` from the head" in err
    assert not (tmp_path / "s").exists()


def test_prepare_runs_the_data_command_on_every_node(node, tmp_path, monkeypatch, capsys):
    """`python -m agent cluster prepare ...` builds the dataset in the node's own cache."""
    monkeypatch.setenv("SPEEDLOOP_DATA", str(tmp_path / "head-data"))
    texts = tmp_path / "notes"
    texts.mkdir()
    for i in range(80):
        (texts / f"n{i}.txt").write_text(f"note {i}: the quick brown fox jumps over the dog.\n")
    assert main(["cluster", "prepare", "text", str(texts), "--name", "notes",
                 "--vocab-size", "300"]) == 0
    assert capsys.readouterr().out.startswith(f"node {ip()} (")
    assert json.loads((node / "data" / "notes" / "meta.json").read_text())["name"] == "notes"
    assert not (tmp_path / "head-data").exists()


@pytest.mark.parametrize("device, devices", [("cuda", "0,1"), ("cpu", "all"), ("cpu", "cpu:x"),
                                             ("cpu", "cpu:0")])
def test_devices_a_cluster_does_not_take_are_refused(device, devices):
    from agent import cluster

    with pytest.raises(SessionStop, match=f"--devices {devices}: with --cluster ray"):
        cluster.check(SessionConfig(device=device, devices=devices, cluster="ray"))


def test_cluster_without_ray_installed_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without the extra
    code = main(["run", "--cluster", "ray", "--no-sandbox", "--wandb", "disabled",
                 "--run-dir", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and err == ("error: --cluster ray needs Ray, which is an optional extra: "
                                 "pip install '.[cluster]'\n")
