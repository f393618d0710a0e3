"""Entry point of `microbert-train`, `python -m train` and `deepspeed train/main.py`: parse, build, run.

A profile naming more than one GPU, or the multi-node flags (`--hostfile`, or `--num-nodes`,
`--node-rank`, `--master-addr`), started without a launcher, start DeepSpeed's launcher
(train/launcher.py); a one-process run stays in this process. Configuration problems are printed
together as one `error:` message with exit code 2, before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

if __package__ in (None, ""):  # `deepspeed train/main.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from microbert.errors import ConfigError, MicroBertError
from microbert.run_config import resolve
from train.args import flag_settings, parse
from train.launcher import NodeLaunch, launch_problems


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.verbose:
        os.environ["MICROBERT_VERBOSE"] = "1"  # read by train/engine.py, here and in launched ranks
    local_rank = args.local_rank
    if local_rank is None and "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ["LOCAL_RANK"])
    under_launcher = local_rank is not None
    try:
        resolved = resolve(
            profile=args.profile,
            ds_config=args.ds_config,
            run_file=args.run_file,
            flags=flag_settings(args),
            world_size=int(os.environ.get("WORLD_SIZE", "1")) if under_launcher else None,
        )
        nodes, problems = _node_launch(args, resolved.train.num_nodes, resolved.profile)
        problem = _missing_gpu(resolved.train.precision, resolved.train.num_gpus, args.profile)
        if problem or (problems and not under_launcher):
            raise ConfigError([*problems, problem] if problem else problems)
        if not under_launcher and (resolved.train.num_gpus > 1 or nodes.multi_node):
            from train.launcher import launch

            return launch(resolved.train.num_gpus, argv, resolved.train.run_dir, nodes)
        if not under_launcher:
            _single_process_env()
        from train.loop import run

        return run(resolved, local_rank)
    except MicroBertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def _node_launch(
    args: argparse.Namespace, profile_nodes: int, profile: str | None
) -> tuple[NodeLaunch, list[str]]:
    """The multi-node launch flags, and what is wrong with them (train/launcher.py)."""
    nodes = NodeLaunch(
        hostfile=args.hostfile,
        num_nodes=args.num_nodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )
    if nodes.node_rank is not None and nodes.num_nodes is None:
        nodes.num_nodes = profile_nodes
    return nodes, launch_problems(nodes, profile_nodes, profile)


def _missing_gpu(precision: str, num_gpus: int, profile: str | None) -> str | None:
    """A GPU setup (bf16, or several GPUs) on a machine where no GPU is visible: say so up front,
    instead of a slow fp32 run on the CPU. `DS_ACCELERATOR=cpu` asks for the CPU on purpose."""
    if os.environ.get("DS_ACCELERATOR") == "cpu" or (precision != "bf16" and num_gpus <= 1):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    what = f"profile {profile!r}" if profile else "this configuration"
    return (
        f"{what} needs {max(num_gpus, 1)} GPU(s) (precision {precision}), but no GPU is visible to this "
        "process: run it where a GPU is visible (in Docker: the NVIDIA container toolkit and a GPU "
        "reservation), or train on the CPU with --profile cpu (or DS_ACCELERATOR=cpu to force it)"
    )


def _single_process_env() -> None:
    """A one-process world without a launcher (else DeepSpeed falls back to MPI discovery)."""
    from train.launcher import free_port

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


if __name__ == "__main__":
    sys.exit(main())
