"""`microbert configs list|show`: model presets (and, when the trainer is installed, hardware profiles)."""

from __future__ import annotations

import argparse
import json

from microbert.config import PRESETS, get_preset


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("configs", help="list or show model presets and hardware profiles")
    sub = parser.add_subparsers(dest="configs_command", metavar="{list,show}", required=True)
    list_parser = sub.add_parser("list", help="all presets with parameter counts")
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
    if args.json:
        print(json.dumps({"presets": rows}, indent=2))
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
    return 0


def run_show(args: argparse.Namespace) -> int:
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
