"""What a run tells its user: `train.log`, `training_history.json`, `training_history.png`, progress.

Only rank 0 reports. On an interactive terminal progress is a tqdm bar (loss, tokens/s, ETA);
otherwise (CI, `nohup`, a container log) it is one log line every `--log-every` steps, because a
bar redrawn with carriage returns makes an unreadable log file.

Throughput is honest: tokens/s counts non-padding tokens only; MFU = tokens/s × FLOPs per token /
peak FLOP/s, with FLOPs per token = 6·N + 12·L·d·S (N the matmul parameters; PaLM appendix B).
On CPU there is no meaningful peak, so MFU is left out rather than invented.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (no sparsity), matched against the
# accelerator's device name: the one table MFU divides by, in `train.log` and in bench/train_bench.py
# alike, so the two are comparable. A measured matmul peak is lower (about 790 TFLOP/s on an H200,
# 785 on an H100); MFU against the datasheet figure is the convention (PaLM, torchtitan).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10": 125e12,
    "L4": 121e12,
    "L40": 181e12,
}


def peak_flops(device_name: str | None) -> float | None:
    """The datasheet peak of the device named (e.g. "NVIDIA H200"); None for a CPU or an unknown one."""
    if not device_name:
        return None
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # "A100" before "A10"
        if key in device_name:
            return PEAK_FLOPS[key]
    return None


class RunLog:
    """Log lines to the terminal and to `train.log` (rank 0 only; other ranks stay quiet)."""

    def __init__(self, path: Path | None, enabled: bool):
        self.enabled = enabled
        self.path = path
        self._file = path.open("a", encoding="utf-8") if (enabled and path is not None) else None
        self._bar: Any = None

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class Progress:
    """A tqdm bar on a TTY, else periodic log lines."""

    def __init__(self, log: RunLog, *, total: int | None, initial: int, every: int):
        """`total` None: a `--time-budget` run, whose bar counts steps without an end."""
        self.log = log
        self.every = every
        self.bar: Any = None
        if log.enabled and sys.stderr.isatty() and not os.environ.get("MICROBERT_NO_BAR"):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
            log._bar = self.bar

    def update(self, step: int, record: dict[str, Any], eta_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
            if step % self.every == 0:
                self.log._file and self.log._file.write(_line(record, eta_s) + "\n")
        elif step % self.every == 0:
            self.log(_line(record, eta_s))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.log._bar = None


def _line(r: dict[str, Any], eta_s: float) -> str:
    mfu = f" mfu {r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else ""
    return (
        f"step {r['step']} loss {r['loss']:.4f} lr {r['lr']:.2e} grad_norm {r['grad_norm']:.3f} "
        f"tokens/s {r['tokens_per_second']:.0f}{mfu} data_wait {r['data_wait_share'] * 100:.1f}% "
        f"eta {_duration(eta_s)}"
    )


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def write_history(run_dir: Path, history: dict[str, Any], *, plot: bool = True) -> None:
    """`training_history.json` (atomically) and `training_history.png` (loss, accuracy, LR, throughput).

    Drawing costs a second or two (matplotlib), so callers plot at the end of a run and at most every
    few minutes in between; the JSON is written at every checkpoint.
    """
    tmp = run_dir / ".training_history.json.tmp"
    tmp.write_text(json.dumps(history, indent=1) + "\n")
    os.replace(tmp, run_dir / "training_history.json")
    if not plot:
        return
    try:
        plot_history(history, run_dir / "training_history.png")
    except Exception as exc:  # a plot must never cost a checkpoint
        print(f"warning: could not draw training_history.png: {exc}", file=sys.stderr)


def plot_history(history: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = history.get("train", []), history.get("eval", [])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="held-out")
    ax.set(title="MLM loss", xlabel="step", ylabel="cross-entropy (nats)")
    ax.legend()
    ax = axes[0][1]
    if evals:
        ax.plot([r["step"] for r in evals], [r["accuracy"] * 100 for r in evals], "o-", label="model")
        ax.plot(
            [r["step"] for r in evals],
            [r["baseline_accuracy"] * 100 for r in evals],
            "--",
            label="most frequent token",
        )
        ax.legend()
    ax.set(title="held-out masked-token accuracy", xlabel="step", ylabel="%")
    ax = axes[1][0]
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(title="learning rate", xlabel="step")
    ax = axes[1][1]
    ax.plot([r["step"] for r in train], [r["tokens_per_second"] for r in train], lw=0.8)
    ax.set(title="throughput (non-padding tokens/s)", xlabel="step")
    fig.tight_layout()
    tmp = path.with_name(".training_history.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


REPORT_TO = ("none", "tensorboard")


class ScalarReport:
    """`--report-to tensorboard`: the numbers of `training_history.json`, as TensorBoard scalars.

    Written with the `tensorboard` package's SummaryWriter (through `torch.utils.tensorboard`, as
    `transformers`' Trainer does) into `<run>/tensorboard/`, tagged `train/<key>` and `eval/<key>`
    at each record's step. `write(history)` sends the records added since the last call; a resumed
    run starts after the history it restored and purges events a crashed run wrote past it.
    """

    def __init__(self, report_to: str, run_dir: Path, history: dict[str, Any], *, enabled: bool):
        self._writer: Any = None
        self._done = {kind: len(history.get(kind, [])) for kind in ("train", "eval")}
        if report_to == "none" or not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        steps = [r["step"] for kind in ("train", "eval") for r in history.get(kind, [])]
        self._writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), purge_step=max(steps) + 1 if steps else None
        )

    def write(self, history: dict[str, Any]) -> None:
        if self._writer is None:
            return
        written = False
        for kind in ("train", "eval"):
            records = history.get(kind, [])
            for record in records[self._done[kind] :]:
                for key, value in record.items():
                    if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                        self._writer.add_scalar(f"{kind}/{key}", value, record["step"])
                        written = True
            self._done[kind] = len(records)
        if written:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
