"""Submit any stage to a Ray cluster through the Ray Jobs API, and follow it.

    python jobs/submit.py --address http://HEAD:8265 submit +stage=fully_auto input=s3://b/images output=s3://b/ds
    python jobs/submit.py --address http://HEAD:8265 status  JOB_ID
    python jobs/submit.py --address http://HEAD:8265 logs    JOB_ID [--follow]
    python jobs/submit.py --address http://HEAD:8265 stop    JOB_ID
    python jobs/submit.py --address http://HEAD:8265 list

The entry point is always ``python -m pipeline.run <overrides> cluster=existing``: the
job's driver runs on the cluster and joins it with ``address: auto``. The address may
also come from RAY_ADDRESS (as for the ``ray job`` CLI). The overrides are checked here
before anything is submitted (``pipeline.config.guard``: no ``_target_`` outside the
allow-list, no config from outside conf/), and again by the entry point on the cluster.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The checks run against the checkout this script ships (its conf/ and pipeline/).
sys.path.insert(0, str(PROJECT_ROOT))
DEFAULT_RUNTIME_ENV = Path(__file__).resolve().parent / "runtime_env.yaml"
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def entrypoint(overrides: List[str]) -> str:
    """The driver command for a stage: the overrides, plus cluster=existing unless given.

    Raises SystemExit for a command line ``pipeline.run`` would refuse."""
    from pipeline.config.guard import check_command_line

    if not any(o.lstrip("+").startswith("stage=") for o in overrides):
        raise SystemExit("submit needs a stage, e.g. +stage=fully_auto")
    if not any(o.lstrip("+").startswith("cluster=") for o in overrides):
        overrides = [*overrides, "cluster=existing"]
    try:
        check_command_line(overrides)
    except Exception as exc:  # noqa: BLE001  what does not pass the check is not submitted
        raise SystemExit(f"not submitted: {exc}") from None
    return " ".join(["python", "-m", "pipeline.run", *map(shlex.quote, overrides)])


def runtime_env(path: Path) -> dict:
    env = yaml.safe_load(path.read_text()) or {}
    # A relative working_dir means the checkout this script lives in.
    if env.get("working_dir") in (".", None):
        env["working_dir"] = str(PROJECT_ROOT)
    # Nothing git ignores is uploaded either (outputs, runs, virtual environments: a
    # working dir over Ray's upload limit fails with HTTP 413).
    env["excludes"] = sorted(set(env.get("excludes") or []) | set(gitignored()))
    return env


def gitignored() -> list[str]:
    """The patterns of the checkout's .gitignore (Ray's excludes take the same syntax)."""
    ignore = PROJECT_ROOT / ".gitignore"
    if not ignore.is_file():
        return []
    lines = (line.strip() for line in ignore.read_text().splitlines())
    return [line for line in lines if line and not line.startswith(("#", "!"))]


def follow_logs(client: JobSubmissionClient, job_id: str) -> JobStatus:
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return client.get_job_status(job_id)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                        help="Ray dashboard address of the cluster (default: RAY_ADDRESS or local)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_submit = sub.add_parser("submit", help="submit a stage; remaining arguments are Hydra overrides")
    p_submit.add_argument("--runtime-env", type=Path, default=DEFAULT_RUNTIME_ENV)
    p_submit.add_argument("--job-id", default=None, help="submission id (default: generated)")
    p_submit.add_argument("--wait", action="store_true", help="follow the logs until the job ends")
    p_submit.add_argument("overrides", nargs=argparse.REMAINDER)
    for name in ("status", "stop"):
        sub.add_parser(name).add_argument("job_id")
    p_logs = sub.add_parser("logs")
    p_logs.add_argument("job_id")
    p_logs.add_argument("--follow", action="store_true")
    sub.add_parser("list")
    args = parser.parse_args(argv)

    client = JobSubmissionClient(args.address)
    if args.command == "submit":
        cmd = entrypoint(args.overrides)
        job_id = client.submit_job(entrypoint=cmd, runtime_env=runtime_env(args.runtime_env), submission_id=args.job_id)
        print(f"submitted {job_id}: {cmd}")
        if args.wait:
            status = follow_logs(client, job_id)
            while status not in TERMINAL:
                time.sleep(1)
                status = client.get_job_status(job_id)
            print(f"{job_id}: {status}")
            return 0 if status == JobStatus.SUCCEEDED else 1
    elif args.command == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    elif args.command == "logs":
        if args.follow:
            follow_logs(client, args.job_id)
        else:
            print(client.get_job_logs(args.job_id), end="")
    elif args.command == "stop":
        print(f"{args.job_id}: stop requested" if client.stop_job(args.job_id) else f"{args.job_id}: not running")
    elif args.command == "list":
        for job in client.list_jobs():
            print(f"{job.submission_id}\t{job.status}\t{job.entrypoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
