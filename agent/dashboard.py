"""`python -m agent dashboard D`: a saved W&B workspace for the session's group, ready to
watch: speedup against experiment, val loss against training seconds and tokens for the
champion and every candidate, tokens/s and time to target per run, the candidates table,
the progress chart.

`workspace_spec` builds the workspace (wandb-workspaces) without any server, so it is
tested offline; `save` needs W&B online (an API key), and says so in one line when the
session's W&B is offline or disabled.

What this module must never do: write to the ledger, or reach the network unless asked to
save.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.config import SessionStop, stored
from agent.tracking import X_SECONDS, X_TOKENS, resolve_mode


def workspace_spec(session_id: str, entity: str, project: str = "speedloop"):
    """The workspace of one session's runs (W&B group `session_id`)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    progress = ws.Section(name="progress", is_open=True, panels=[
        wr.LinePlot(title="speedup vs experiment", x="decision/experiment",
                    y=["decision/speedup", "decision/best_speedup"]),
        wr.MediaBrowser(title="progress chart", media_keys=["progress"]),
        wr.WeavePanelSummaryTable(table_name="candidates"),
    ])
    curves = ws.Section(name="loss curves", is_open=True, panels=[
        wr.LinePlot(title="val loss vs training seconds", x=X_SECONDS,
                    y=["by_seconds/val_loss"]),
        wr.LinePlot(title="val loss vs tokens", x=X_TOKENS, y=["by_tokens/val_loss"]),
        wr.LinePlot(title="train loss vs training seconds (the trainer's word)",
                    x=X_SECONDS, y=["by_seconds/train_loss"]),
    ])
    runs = ws.Section(name="per run", is_open=True, panels=[
        wr.BarPlot(title="tokens/s per run", metrics=["tokens_per_sec"]),
        wr.BarPlot(title="time to target per run (s)", metrics=["time_to_target"]),
        wr.LinePlot(title="tokens/s during each run", x=X_SECONDS,
                    y=["by_seconds/tokens_per_sec"]),
    ])
    return ws.Workspace(
        entity=entity, project=project, name=f"speedloop {session_id}",
        sections=[progress, curves, runs],
        runset_settings=ws.RunsetSettings(filters=f"Group = '{session_id}'"))


def save(run_dir: Path) -> str:
    """Save the session's workspace on the W&B server; returns its URL. Raises SessionStop
    (one line) when there is no server to save it on."""
    session, config = stored(run_dir)
    mode = resolve_mode(config.wandb if config.wandb != "auto" else None)
    if mode != "online":
        raise SessionStop(
            f"no W&B server for {run_dir}: its W&B is {mode}; set WANDB_API_KEY (or `wandb "
            f"login`), upload the runs with `wandb sync {run_dir}/wandb/offline-run-*`, "
            "then run this again")
    import wandb

    entity = os.environ.get("WANDB_ENTITY") or wandb.Api().default_entity
    workspace = workspace_spec(session["id"], entity)
    workspace.save()
    return workspace.url
