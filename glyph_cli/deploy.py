"""`glyph deploy`: set up the Prefect side on a fresh machine (deployments/README.md).

`glyph deploy`, against the configured PREFECT_API_URL (else the running server of this
PREFECT_HOME, glyph_cli/server.py):
1. creates (or updates) the process work pools `cpu` and `gpu`, the latter with a concurrency
   limit of `--gpu-slots` (one flow run per GPU);
2. runs `prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml` from the
   repository root (the deployments, their schedule, trigger and concurrency limits);
3. puts back the default parameters a person edited in the UI (`prefect deploy` replaces them
   with the file's), unless `--reset-parameters`;
4. creates or updates, by name, the automations of deployments/automations.yaml;
5. prints the worker commands and the UI address.

It is idempotent: run it again after editing prefect.yaml.

Prefect is imported inside the functions: it takes about a second to import, and `glyph --help`
and the other commands need none of it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from glyph_cli.common import fail
from glyph_cli.server import find_server

REPO = Path(__file__).resolve().parents[1]
POOLS = ("cpu", "gpu")


def _api_url() -> str | None:
    """The configured API, else the running server of this PREFECT_HOME (however started)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or find_server()


def ui_url(api_url: str) -> str:
    return api_url.rstrip("/").removesuffix("/api")


async def _check_api() -> None:
    from prefect import get_client

    async with get_client() as client:
        error = await client.api_healthcheck()
    if error is not None:
        raise RuntimeError(f"Prefect API not reachable: {error}")


async def ensure_pools(slots: dict[str, int | None]) -> list[str]:
    """Create the process pools that do not exist; set every pool's concurrency limit."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    done = []
    async with get_client() as client:
        for name, limit in slots.items():
            try:
                pool = await client.read_work_pool(name)
            except ObjectNotFound:
                await client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type="process",
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                        concurrency_limit=limit,
                        description=f"glyph pipeline: {name} stages",
                    )
                )
                done.append(f"created work pool {name!r} (process, concurrency {limit or 'unlimited'})")
            else:
                if pool.concurrency_limit != limit:
                    await client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))
                done.append(f"work pool {name!r} exists ({pool.type}, concurrency {limit or 'unlimited'})")
    return done


def load_automations(path: Path) -> list[Any]:
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    data = yaml.safe_load(path.read_text())
    items = data.get("automations", []) if isinstance(data, dict) else data
    return [AutomationCore.model_validate(item) for item in items]


async def list_deployments() -> list[str]:
    from prefect import get_client

    async with get_client() as client:
        deployments = await client.read_deployments()
        flows = {f.id: f.name for f in await client.read_flows()}
    lines = []
    for d in sorted(deployments, key=lambda d: (flows.get(d.flow_id, ""), d.name)):
        gcl = getattr(d, "global_concurrency_limit", None)
        extra = [f"concurrency {gcl.limit}"] if gcl is not None else []
        extra += [f"schedule {cron}" for s in d.schedules if (cron := getattr(s.schedule, "cron", None))]
        lines.append(
            f"deployment {flows.get(d.flow_id, '?')}/{d.name} -> pool {d.work_pool_name} {', '.join(extra)}"
        )
    return lines


async def deployment_parameters() -> dict[str, dict[str, Any]]:
    """`{"flow/deployment": its default parameters}` for every deployment on the server."""
    from prefect import get_client

    async with get_client() as client:
        deployments = await client.read_deployments()
        flows = {f.id: f.name for f in await client.read_flows()}
    return {f"{flows.get(d.flow_id, '?')}/{d.name}": dict(d.parameters or {}) for d in deployments}


async def restore_parameters(before: dict[str, dict[str, Any]]) -> list[str]:
    """Put back the parameters deployments had before `prefect deploy` replaced them."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    done = []
    after = await deployment_parameters()
    async with get_client() as client:
        for name, old in sorted(before.items()):
            if name not in after or after[name] == old:
                continue
            deployment = await client.read_deployment_by_name(name)
            try:
                await client.update_deployment(deployment.id, DeploymentUpdate(parameters=old))
            except Exception as exc:  # e.g. a parameter the flow no longer takes: the file's stay
                done.append(f"could not keep the parameters of {name} ({exc}); it has the file's now")
                continue
            done.append(f"kept the parameters of {name} as edited: {old} (--reset-parameters resets them)")
    return done


async def ensure_automations(path: Path) -> list[str]:
    """Create each automation of the file, or update the one with the same name."""
    from prefect import get_client

    done = []
    async with get_client() as client:
        for automation in load_automations(path):
            existing = await client.read_automations_by_name(automation.name)
            if existing:
                await client.update_automation(existing[0].id, automation)
                for extra in existing[1:]:
                    await client.delete_automation(extra.id)
                done.append(f"updated automation {automation.name!r}")
            else:
                await client.create_automation(automation)
                done.append(f"created automation {automation.name!r}")
    return done


def run_prefect_deploy(prefect_file: Path, repo: Path) -> None:
    env = {**os.environ, "GLYPH_REPO_DIR": str(repo)}
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "--all",
        "--prefect-file",
        str(prefect_file),
    ]
    proc = subprocess.run(cmd, cwd=repo, env=env, text=True, capture_output=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"`{' '.join(cmd[2:])}` failed with exit code {proc.returncode}")


def worker_commands(api_url: str) -> list[str]:
    prefix = f"PREFECT_API_URL={api_url}"
    return [
        f"{prefix} prefect worker start --pool cpu --type process",
        f"{prefix} CUDA_VISIBLE_DEVICES=0 prefect worker start --pool gpu --type process   # on the GPU host",
    ]


def register(app: typer.Typer) -> None:
    @app.command("deploy")
    def deploy(
        gpu_slots: Annotated[
            int, typer.Option(help="Concurrency limit of the gpu pool: flow runs at once (one per GPU).")
        ] = 1,
        cpu_slots: Annotated[
            int, typer.Option(help="Concurrency limit of the cpu pool (0 = unlimited).")
        ] = 0,
        prefect_file: Annotated[Path, typer.Option(help="The deployments file.")] = REPO
        / "deployments"
        / "prefect.yaml",
        automations: Annotated[Path, typer.Option(help="The automations file.")] = REPO
        / "deployments"
        / "automations.yaml",
        repo: Annotated[
            Path, typer.Option(help="Repository root: entrypoints are relative to it, workers run it.")
        ] = REPO,
        reset_parameters: Annotated[
            bool,
            typer.Option(help="Give the deployments the file's parameters, dropping those edited in the UI."),
        ] = False,
    ) -> None:
        """Create the cpu and gpu work pools, deploy everything, create the automations."""
        api_url = _api_url()
        if not api_url:
            fail(
                "no Prefect server: PREFECT_API_URL is not set and none runs for this PREFECT_HOME.\n"
                "Start one with `glyph server start` (or point PREFECT_API_URL at yours).",
                code=2,
            )
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.environ["PREFECT_API_URL"] = api_url  # for `prefect deploy`
        repo = repo.resolve()
        try:
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                asyncio.run(_check_api())
                for line in asyncio.run(ensure_pools({"cpu": cpu_slots or None, "gpu": gpu_slots or None})):
                    typer.echo(line)
                before = {} if reset_parameters else asyncio.run(deployment_parameters())
                typer.echo(f"deploying {prefect_file} ...")
                run_prefect_deploy(prefect_file.resolve(), repo)
                for line in asyncio.run(restore_parameters(before)):
                    typer.echo(line)
                for line in asyncio.run(list_deployments()):
                    typer.echo(f"  {line}")
                for line in asyncio.run(ensure_automations(automations.resolve())):
                    typer.echo(line)
        except Exception as exc:  # one readable line for people; details above
            fail(f"glyph deploy failed: {exc}")
        typer.echo("\nStart the workers (each in its own terminal, or as a service):")
        for cmd in worker_commands(api_url):
            typer.echo(f"  {cmd}")
        typer.echo(f"(they run the checkout at {repo}; it must exist at that path on each worker's host)")
        typer.echo(f"\nUI: {ui_url(api_url)}  (Deployments > glyph-pipeline / default > Run)")
        typer.echo(
            f"Run from the command line: PREFECT_API_URL={api_url} prefect deployment run glyph-pipeline/default -p profile=tiny"
        )
