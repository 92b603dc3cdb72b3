"""Launchers: one machine (``local``), ``torchrun``, and Ray Train.

Each starts the software switch when the job trains through switchml and no
``--controller`` was given, then runs ``trainer.loop.train_rank`` on every rank. Each hands
the control channel's cluster secret (``--secret-file`` or the environment's) to every rank
and to the switch through ``$SWITCHML_SECRET``; the local and Ray launchers make a fresh one
for a switch they start, so their control channel is always authenticated (docs/security.md).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path

from emulation.spawn import spawn_switch, stop_process
from switchml import defaults
from switchml.extras import needs
from switchml.net import free_port
from switchml.security import is_local_endpoint, read_secret, secret_env
from trainer.config import TrainConfig

log = logging.getLogger(__name__)


def _cluster_secret(args: TrainConfig, fresh: bool) -> bytes | None:
    """The secret of the control channel: --secret-file, else the environment's, else (``fresh``:
    this launcher starts the switch itself) a new random one. Put into this process's
    environment, which every rank and switch it starts inherits."""
    secret = read_secret(args.secret_file)
    if secret is None and fresh:
        secret = secrets.token_urlsafe(32).encode()
    if secret is not None:
        os.environ.update(secret_env(secret))
    return secret


def _local_entry(index: int, args: TrainConfig, world_size: int) -> None:
    from trainer.loop import train_rank

    logging.basicConfig(level=logging.WARNING if index else logging.INFO,
                        format=f"[rank {index}] %(name)s %(levelname)s %(message)s")
    train_rank(args, index, world_size, local_rank=index)


def launch_local(args: TrainConfig) -> tuple[TrainConfig, dict]:
    """Start the software switch (unless --controller) and ``args.workers`` processes here.

    Returns the config the ranks ran with and rank 0's final metrics (as every launcher)."""
    import torch.multiprocessing as mp

    runner = None
    if args.comm == "switchml":
        secret = _cluster_secret(args, fresh=not args.controller)
        if not args.controller:
            from emulation.runner import SoftwareSwitchRunner

            runner = SoftwareSwitchRunner("127.0.0.1", 0, 0, drop_probability=args.drop_probability, secret=secret,
                                          **({"k": args.k} if args.k else {}))
            args = args.replace(controller=runner.endpoint)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        mp.start_processes(_local_entry, args=(args, args.workers), nprocs=args.workers, join=True,
                           start_method="spawn")
    finally:
        if runner is not None:
            drops = {k: v for k, v in runner.switch.drops().items() if v}
            if drops:
                log.info("switch drops: %s", drops)
            runner.stop()
    return args, json.loads((Path(args.out) / "final_metrics.json").read_text())


def launch_torchrun(args: TrainConfig) -> tuple[TrainConfig, dict]:
    """Run this rank under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR from its environment).

    Without --controller, global rank 0 starts the software switch as a child process on
    MASTER_ADDR with the default ports, and every rank uses it.
    """
    from trainer.loop import train_rank

    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    except KeyError as exc:
        raise SystemExit(f"switchml-train --launcher torchrun: {exc.args[0]} is not set; start it with "
                         "`torchrun --nproc_per_node N -m trainer.cli TASK --launcher torchrun ...`") from None
    # torchrun, not --workers, decides how many ranks there are; the summary reports args.workers
    args = args.replace(workers=world_size)
    switch = None
    # ranks cannot agree on a fresh secret before they talk: it is the user's (torchrun's
    # environment, or --secret-file on every rank's command line)
    secret = _cluster_secret(args, fresh=False) if args.comm == "switchml" else None
    if args.comm == "switchml" and not args.controller:
        host = os.environ.get("MASTER_ADDR", defaults.SWITCH_HOST)
        if host == "localhost":
            host = "127.0.0.1"
        args = args.replace(controller=f"tcp://{host}:{defaults.CONTROL_PORT}")
        if secret is None and not is_local_endpoint(args.controller):
            raise SystemExit(f"switchml-train --launcher torchrun: the software switch would serve its control channel "
                             f"on MASTER_ADDR {host}, which other hosts reach, without a secret: pass --secret-file FILE "
                             f"(the same file on every host) or set ${defaults.SECRET_ENV} (docs/security.md)")
        if rank == 0:
            switch = spawn_switch(host, defaults.SWITCH_PORT, defaults.CONTROL_PORT,
                                  drop_probability=args.drop_probability, k=args.k or None)
    try:
        train_rank(args, rank, world_size, local_rank)
    finally:
        if switch is not None:
            stop_process(switch)
    path = Path(args.out) / "final_metrics.json"
    return args, (json.loads(path.read_text()) if rank == 0 else {})


#: Ray Train features a switchml-train run does not use, off unless the user set them: the
#: preemption watcher (for spot instances) is one more actor to start, and it logs an error
#: about its own arguments on every run.
RAY_TRAIN_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
#: Ray Train loggers that warn about what a cluster without Ray's dashboard lacks (the State
#: API; ``ray[train]`` has no dashboard): the placement-group cleaner warns at every check,
#: a dozen lines a run. Errors still show.
QUIET_RAY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for switchml-train: runs in every process of the job
    (ranks and Ray Train's own actors) before its work, and quiets ``QUIET_RAY_LOGGERS``."""
    for name in QUIET_RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _ray_loop(config: dict) -> None:
    with needs("ray", "switchml-train --launcher ray"):
        import ray.train

    from trainer.loop import train_rank

    ctx = ray.train.get_context()
    args = TrainConfig.from_dict(config)
    train_rank(args, ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())


def launch_ray(args: TrainConfig) -> tuple[TrainConfig, dict]:
    """Run the ranks as a Ray Train ``TorchTrainer`` on ``--ray-address`` (or a local cluster).

    Without --controller the software switch runs on this (the driver's) node, on its IP.
    """
    with needs("ray", "switchml-train --launcher ray"):
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = args.device == "cuda"
    secret = _cluster_secret(args, fresh=not args.controller) if args.comm == "switchml" else None
    for name, value in RAY_TRAIN_DEFAULTS.items():
        os.environ.setdefault(name, value)  # Ray Train passes these on to its controller
    # every rank gets the secret through the job's environment, on whichever node it runs
    runtime_env = {"worker_process_setup_hook": f"{__name__}.quiet_ray_worker",
                   **({"env_vars": secret_env(secret)} if secret else {})}
    started = time.monotonic()
    if args.ray_address:
        ray.init(address=args.ray_address, include_dashboard=False, runtime_env=runtime_env)
        host = ray.util.get_node_ip_address()
    else:
        ray.init(num_cpus=max(2, args.workers + 1), include_dashboard=False, runtime_env=runtime_env)
        host = "127.0.0.1"
    log.info("Ray: cluster %s in %.1f s", args.ray_address or "(local) started", time.monotonic() - started)
    runner = None
    try:
        if args.comm == "switchml" and not args.controller:
            from emulation.runner import SoftwareSwitchRunner

            runner = SoftwareSwitchRunner(host, 0, 0, drop_probability=args.drop_probability, secret=secret,
                                          **({"k": args.k} if args.k else {}))
            args = args.replace(controller=runner.endpoint)
        out = Path(args.out).resolve()
        args = args.replace(out=str(out))
        trainer = TorchTrainer(
            _ray_loop, train_loop_config=args.to_dict(),
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(storage_path=str(out / "ray"), name=f"{args.task}-{int(time.time())}"),
        )
        fit_started = time.monotonic()
        trainer.fit()
        log.info("Ray Train: the run took %.1f s, start-up and shut-down of its workers included",
                 time.monotonic() - fit_started)
    finally:
        if runner is not None:
            runner.stop()
        stopping = time.monotonic()
        ray.shutdown()
        log.info("Ray: shut down in %.1f s", time.monotonic() - stopping)
    return args, json.loads((out / "final_metrics.json").read_text())


LAUNCHERS = {"local": launch_local, "torchrun": launch_torchrun, "ray": launch_ray}
