"""`microbert configs list|show`: model presets (and, when the trainer is installed, hardware profiles)."""

from __future__ import annotations

import argparse
import json

from microbert.config import PRESETS, ModelConfig, get_preset
from microbert.errors import ConfigError
from microbert.plan import AT_LAUNCH, Placement, RunPlan, plan_run
from microbert.run_config import Resolved


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("configs", help="list or show model presets and hardware profiles")
    sub = parser.add_subparsers(dest="configs_command", metavar="{list,show}", required=True)
    list_parser = sub.add_parser("list", help="all presets and hardware profiles")
    list_parser.add_argument("--json", action="store_true")
    list_parser.set_defaults(func=run_list)
    show_parser = sub.add_parser("show", help="one preset (or profile) in full")
    show_parser.add_argument("name")
    show_parser.add_argument("--json", action="store_true")
    show_parser.set_defaults(func=run_show)


def preset_rows() -> list[dict[str, object]]:
    rows = []
    for name, preset in PRESETS.items():
        c = preset.config
        rows.append(
            {
                "name": name,
                "layers": c.num_hidden_layers,
                "heads": c.num_attention_heads,
                "hidden": c.hidden_size,
                "intermediate": c.intermediate_size,
                "vocab": c.vocab_size,
                "positions": c.max_position_embeddings,
                "parameters": c.num_parameters(),
                "fp32_weights_mib": round(c.num_parameters() * 4 / 2**20, 1),
                "description": preset.description,
            }
        )
    return rows


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def run_list(args: argparse.Namespace) -> int:
    rows = preset_rows()
    profiles = profile_rows()
    if args.json:
        print(json.dumps({"presets": rows, "profiles": profiles}, indent=2))
        return 0
    header = f"{'preset':<12} {'layers':>6} {'heads':>5} {'hidden':>6} {'vocab':>6} {'seq':>5} "
    header += f"{'params':>9}  source"
    print("Model presets")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['name']:<12} {r['layers']:>6} {r['heads']:>5} {r['hidden']:>6} {r['vocab']:>6} "
            f"{r['positions']:>5} {_millions(int(r['parameters'])):>9}  {r['description']}"  # type: ignore[call-overload]
        )
    if profiles:
        print("\nHardware profiles (microbert-train --profile NAME)")
        header = (
            f"{'profile':<18} {'hardware':<15} {'model':<11} {'params':>8} {'seq':>4} {'batch':>5} "
            f"{'GiB/GPU':>7}  dataset"
        )
        print(header)
        print("-" * len(header))
        for p in profiles:
            params = _millions(int(p["parameters"]))  # type: ignore[call-overload]
            print(
                f"{p['name']:<18} {p['hardware']!s:<15} {p['model']:<11} {params:>8} "
                f"{p['seq_len']:>4} {p['micro_batch_size']!s:>5} {p['static_gib_per_gpu']:>7}  {p['dataset']}"
            )
    return 0


def run_show(args: argparse.Namespace) -> int:
    from microbert.run_config import profile_names

    if args.name not in PRESETS and args.name in profile_names():
        return show_profile(args.name, as_json=args.json)
    if args.name not in PRESETS:
        raise ConfigError(
            f"unknown preset or profile {args.name!r}; presets: {', '.join(sorted(PRESETS))}; "
            f"profiles: {', '.join(profile_names())}"
        )
    config = get_preset(args.name)
    data = {
        "preset": args.name,
        **config.to_dict(),
        "parameters": config.num_parameters(),
        "training_flops_per_token": config.training_flops_per_token(min(128, config.max_position_embeddings)),
    }
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key:<{width}}  {value}")
    return 0


# --- hardware profiles (data files in train/profiles, resolved without importing the trainer) ------
def static_memory_gib(config: ModelConfig, num_gpus: int, precision: str) -> float:
    """Weights, gradients and Adam state per GPU under ZeRO-1, before activations.

    bf16: 2-byte weights and gradients on every GPU plus fp32 master weights and two fp32 moments
    (12 bytes per parameter) split across GPUs; fp32: 4 + 4 bytes plus the 8-byte moments split.
    """
    n = config.num_parameters()
    replicated, sharded = (4 + 4, 8) if precision == "fp32" else (2 + 2, 12)
    per_gpu = n * replicated + n * sharded / num_gpus
    return round(per_gpu / 2**30, 2)


def profile_rows() -> list[dict[str, object]]:
    from microbert.run_config import profile_names, resolve

    rows: list[dict[str, object]] = []
    for name in profile_names():
        try:
            r = resolve(profile=name, ds_config=None, run_file=None, flags={})
        except ConfigError as exc:
            rows.append({"name": name, "error": str(exc)})
            continue
        t = r.train
        rows.append(
            {
                "name": name,
                "hardware": profile_hardware(name),
                "num_gpus": t.num_gpus,
                "model": t.model,
                "parameters": r.model_config.num_parameters(),
                "seq_len": t.seq_len,
                "micro_batch_size": t.micro_batch_size,
                "dataset": t.dataset,
                "num_nodes": t.num_nodes,
                "static_gib_per_gpu": static_memory_gib(
                    r.model_config, t.num_gpus * t.num_nodes, t.precision
                ),
            }
        )
    return [row for row in rows if "error" not in row] + [row for row in rows if "error" in row]


def profile_hardware(name: str) -> str:
    """The machine a profile is made for, as its file says ("CPU (2+ cores)", "8x H200 141 GB").

    `num_gpus` alone would call the cpu profile's one process "1 GPU"."""
    from microbert.run_config import PROFILES_DIR

    data = json.loads((PROFILES_DIR / f"{name}.json").read_text())
    return str(data.get("hardware") or f"{data.get('num_gpus', 1)} GPU(s)")


def _on_cpu(hardware: str) -> bool:
    return hardware.lower().startswith("cpu")


def processes(num_gpus: int, hardware: str) -> str:
    on_cpu = _on_cpu(hardware)
    return f"{num_gpus} process" + ("es" if num_gpus > 1 else "") + ("" if on_cpu else ", one per GPU")


def launch_commands(name: str, num_gpus: int, num_nodes: int = 1) -> list[str]:
    """What `microbert-train --profile NAME` runs: in-process for one GPU, the DeepSpeed launcher for more.

    A profile for several nodes gets the two ways to start it (README: Multi-node): from one node
    over pdsh/ssh with a hostfile, or the same command on every node with its node rank.
    """
    if num_nodes > 1:
        flags = f"--num-nodes {num_nodes} --master-addr NODE0_ADDRESS"
        return [
            f"from one node over pdsh/ssh (a hostfile with one 'HOST slots={num_gpus}' line per node):",
            f"  microbert-train --profile {name} --hostfile HOSTFILE",
            "or on each node, e.g. from a SLURM or Kubernetes job (port 29500 unless --master-port):",
            *(
                f"  node {rank}: microbert-train --profile {name} {flags} --node-rank {rank}"
                for rank in range(num_nodes)
            ),
        ]
    commands = [f"microbert-train --profile {name}"]
    if num_gpus > 1:
        commands.append(
            f"  = deepspeed --num_gpus {num_gpus} --module train.main --profile {name}   (started for you)"
        )
    return commands


def profile_plan(resolved: Resolved, hardware: str) -> RunPlan:
    """The run plan of a profile before launch (`microbert.plan`): rank 0 of `num_gpus × num_nodes`
    processes on the profile's device; the micro-batch "auto", the prepared data and what follows
    from them are left to the launch."""
    t = resolved.train
    placement = Placement(
        rank=0,
        local_rank=0,
        world_size=t.num_gpus * t.num_nodes,
        device="cpu" if _on_cpu(hardware) else "cuda",
        precision=t.precision,
    )
    return plan_run(resolved, placement)


def show_profile(name: str, *, as_json: bool) -> int:
    from microbert.run_config import resolve

    r = resolve(profile=name, ds_config=None, run_file=None, flags={})
    hardware = profile_hardware(name)
    plan = profile_plan(r, hardware).to_dict()["plan"]
    data = r.to_dict()
    data["parameters"] = r.model_config.num_parameters()
    data["training_flops_per_token"] = r.model_config.training_flops_per_token(r.train.seq_len)
    data["static_gib_per_gpu"] = static_memory_gib(
        r.model_config, r.train.num_gpus * r.train.num_nodes, r.train.precision
    )
    data["launch"] = launch_commands(name, r.train.num_gpus, r.train.num_nodes)
    data["hardware"] = hardware
    data["plan"] = plan
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    t = r.train
    ranks = processes(t.num_gpus * t.num_nodes, data["hardware"])
    print(
        f"profile {name}: {data['hardware']}, {ranks}, model {t.model} "
        f"({_millions(r.model_config.num_parameters())})"
    )
    print(f"layers: {' < '.join(r.sources)}")
    print("\nlaunch:")
    for line in data["launch"]:
        print(f"  {line}")
    print(
        f"\nmemory: ~{data['static_gib_per_gpu']} GiB per GPU for weights, gradients and Adam state "
        f"(ZeRO-1, {t.precision}); activations scale with the micro-batch"
    )
    print("\ntrain:")
    train = t.to_dict()
    width = max(len(k) for k in train)
    for key, value in train.items():
        print(f"  {key:<{width}}  {value}")
    print("\nmodel:")
    for key, value in r.model_config.to_dict().items():
        print(f"  {key:<{width}}  {value}")
    print(
        f'\nplan (what the trainer computes from the above, once; "{AT_LAUNCH}" where only the launch knows):'
    )
    shown = {
        section: {k: v for k, v in plan[section].items() if k not in ("rank", "local_rank")}
        for section in ("placement", "data", "batch", "schedule")
    }
    key_width = max(len(k) for values in shown.values() for k in values)
    for section, values in shown.items():
        print(f"  {section}")
        for key, value in values.items():
            print(f"    {key:<{key_width}}  {value}")
    print("\ndeepspeed (before the trainer sets batch, precision and ZeRO stage from the above):")
    print("  " + json.dumps(r.deepspeed))
    return 0
