"""Regenerate the outputs and figures README.md shows, from real runs, and rewrite them in place.

    python bench/readme_outputs.py --train          # the quick start from scratch (runs/cpu), then all
    python bench/readme_outputs.py                  # from an existing runs/cpu
    python bench/readme_outputs.py --check          # exit 1 (and show a diff) if README.md is stale

What it rewrites, each between markers in README.md:
- `<!-- output: NAME -->` before a ```text block: the block becomes the output of the README command
  it belongs to, run as shown against the quick-start run folder (`quickstart-predict`: the quick
  start's `microbert predict`; `curl-fill-mask`: the Serving section's `curl`, against a
  `microbert-serve` of that run folder started here).
- `<!-- figure: NAME -->…<!-- /figure -->` inline: `padding`, the padding share of the embedded corpus
  at 128 and 512 tokens (`microbert data prepare --seq-len N --json`); `cpu-eval`, the quick-start
  model's fill-mask accuracy (`microbert eval --json`) on the book it never saw and on the held-out
  documents, with the constant guess on the same positions.
- `<!-- recorded: NAME -->` … `<!-- /recorded -->`, each on its own line: figures rendered from the
  benchmark records in `bench/results/` by bench/readme_records.py (`serve-cpu`, the 2-core serving
  table; `data-speed`, the data pipeline's speeds), with the machine and date the records carry. No
  benchmark runs for them: `--records-only` renders (or `--check`s) these alone, offline, in a moment.

The commands are read from README.md itself (its ```sh blocks), so what is shown is what the shown
command prints. tests/test_readme.py runs the same commands on a tiny run and checks that the
README's outputs have the shapes those commands produce.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` when run as a script
from bench import readme_records

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent  # microbert, microbert-train, microbert-serve of this environment

OUTPUTS = ("quickstart-predict", "curl-fill-mask")
FIGURES = ("padding", "cpu-eval")
RECORDED = tuple(readme_records.RENDERERS)
RUN_FOLDER = "runs/cpu"  # what the quick start trains


# --- reading README.md -------------------------------------------------------------------------------
@dataclass
class Block:
    """A fenced block: its info string (sh, text, python), its text, where it sits, its marker."""

    info: str
    text: str
    first_line: int  # index of the first content line
    last_line: int  # index one past the last content line
    marker: str | None  # the `<!-- ... -->` on the line before the fence, if any


MARKER = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")
FIGURE = re.compile(r"<!-- figure: (?P<name>[\w-]+) -->(?P<value>.*?)<!-- /figure -->")


def blocks(text: str) -> list[Block]:
    lines = text.split("\n")
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            info = lines[i][3:].strip()
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
            marker = MARKER.match(lines[i - 1]) if i > 0 else None
            found.append(Block(info, "\n".join(lines[start:end]), start, end, marker and marker.group(1)))
            i = end + 1
        else:
            i += 1
    return found


def commands(block: Block) -> list[list[str]]:
    """A ```sh block's commands as argv lists: `\\` continuations joined, `# comments` dropped, and a
    line of `a && b` split into its commands."""
    joined = block.text.replace("\\\n", " ")
    out: list[list[str]] = []
    for line in joined.split("\n"):
        tokens = shlex.split(line, comments=True)
        segment: list[str] = []
        for token in tokens:
            if token == "&&":
                out.append(segment)
                segment = []
            else:
                segment.append(token)
        if segment:
            out.append(segment)
    return out


def all_commands(text: str) -> list[list[str]]:
    return [argv for block in blocks(text) if block.info == "sh" for argv in commands(block)]


def output_block(text: str, name: str) -> Block:
    matches = [b for b in blocks(text) if b.marker == f"output: {name}"]
    if len(matches) != 1:
        raise SystemExit(f"README.md has {len(matches)} blocks marked `<!-- output: {name} -->`, not one")
    return matches[0]


def quickstart(text: str) -> tuple[list[str], list[str]]:
    """The quick start's `microbert-train` and `microbert predict` commands."""
    first_sh = next(b for b in blocks(text) if b.info == "sh")
    argvs = commands(first_sh)
    train = next(a for a in argvs if a[0] == "microbert-train")
    predict = next(a for a in argvs if a[:2] == ["microbert", "predict"])
    return train, predict


def curl_fill_mask(text: str) -> list[str]:
    """The Serving section's curl against POST /fill-mask (the one whose output is shown)."""
    return next(a for a in all_commands(text) if a[0] == "curl" and "top_k" in " ".join(a))


def replace_block(text: str, name: str, content: str) -> str:
    block = output_block(text, name)
    lines = text.split("\n")
    return "\n".join([*lines[: block.first_line], content.rstrip("\n"), *lines[block.last_line :]])


def replace_figure(text: str, name: str, value: str) -> str:
    pattern = re.compile(rf"(<!-- figure: {re.escape(name)} -->).*?(<!-- /figure -->)")
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"README.md needs exactly one `<!-- figure: {name} -->…<!-- /figure -->`")
    return pattern.sub(lambda m: m.group(1) + value + m.group(2), text)


def replace_recorded(text: str, name: str, content: str) -> str:
    """The lines between `<!-- recorded: NAME -->` and the next `<!-- /recorded -->` become `content`."""
    pattern = re.compile(rf"(^<!-- recorded: {re.escape(name)} -->\n).*?(^<!-- /recorded -->$)", re.M | re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"README.md needs exactly one `<!-- recorded: {name} -->` … `<!-- /recorded -->`")
    return pattern.sub(lambda m: m.group(1) + content.rstrip("\n") + "\n" + m.group(2), text)


def render_recorded(text: str, results: Path = readme_records.RESULTS) -> str:
    """README.md with every record-rendered part regenerated from the records in `results`."""
    records = readme_records.load(results)
    for name, render in readme_records.RENDERERS.items():
        text = replace_recorded(text, name, render(records))
    return text


# --- running what README.md shows ----------------------------------------------------------------------
def resolve(argv: list[str]) -> list[str]:
    """The project's entry points from this environment, whatever PATH says."""
    head = BIN / argv[0]
    return [str(head), *argv[1:]] if head.is_file() else argv


def run(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 3600) -> str:
    result = subprocess.run(
        resolve(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def on_port(argv: list[str], port: int) -> list[str]:
    """A README command with its server address (localhost:8000 / 127.0.0.1:8000) moved to `port`."""
    return [re.sub(r"(localhost|127\.0\.0\.1):8000", rf"\g<1>:{port}", a) for a in argv]


@contextmanager
def serving(model_dir: Path, *, cwd: Path, env: dict[str, str] | None = None) -> Iterator[int]:
    """`microbert-serve --model-dir DIR` on a free loopback port until the block ends; yields the port."""
    import httpx

    port = free_port()
    argv = resolve(["microbert-serve", "--model-dir", str(model_dir), "--port", str(port)])
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"microbert-serve did not become ready:\n{log.read()[-3000:]}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def outputs(text: str, *, cwd: Path, run_dir: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """Each marked output, produced by running its README command against `run_dir` (a path relative
    to `cwd`, or absolute)."""
    _, predict = quickstart(text)
    predict = [run_dir if a == RUN_FOLDER else a for a in predict]
    result = {"quickstart-predict": run(predict, cwd=cwd, env=env)}
    with serving(Path(run_dir), cwd=cwd, env=env) as port:
        result["curl-fill-mask"] = run(on_port(curl_fill_mask(text), port), cwd=cwd, env=env)
    return result


def padding_figure(*, cwd: Path, cache_dir: str | None) -> str:
    shares = []
    for seq_len in (128, 512):
        argv = ["microbert", "data", "prepare", "--seq-len", str(seq_len), "--json"]
        if cache_dir:
            argv += ["--cache-dir", cache_dir]
        shares.append(json.loads(run(argv, cwd=cwd))["padding_fraction"])
    return f"{100 * shares[0]:.3f}% padding, at 512 {100 * shares[1]:.3f}%"


def cpu_eval_figure(*, cwd: Path, run_dir: str) -> str:
    """The quick-start model scored as `microbert eval` scores it (every scored position [MASK]ed)."""
    parts = []
    for dataset, split, what in (
        ("embedded-heldout", "all", "on *Persuasion*, a novel it never saw"),
        ("embedded", "heldout", "on the held-out documents of the embedded corpus"),
    ):
        argv = ["microbert", "eval", "--model-dir", run_dir, "--dataset", dataset, "--split", split, "--json"]
        r = json.loads(run(argv, cwd=cwd))
        parts.append(
            f"{100 * r['accuracy']:.2f}% top-1 ({100 * r['top5_accuracy']:.2f}% top-5) {what}, against "
            f"{100 * r['baseline_accuracy']:.2f}% for the constant guess on the same "
            f"{r['num_masked']:,} positions ({r['over_baseline']:.2f}×)"
        )
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--run-dir", default=RUN_FOLDER, help="the quick-start run folder (default runs/cpu)")
    parser.add_argument("--train", action="store_true", help="run the quick start's microbert-train first")
    parser.add_argument("--cache-dir", help="data cache for the figures (default the usual one)")
    parser.add_argument("--no-figures", action="store_true", help="leave the inline figures as they are")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if README.md differs")
    parser.add_argument(
        "--records-only",
        action="store_true",
        help="only the parts rendered from bench/results/ (no run folder, nothing run)",
    )
    parser.add_argument("--results", type=Path, default=readme_records.RESULTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    text = args.readme.read_text(encoding="utf-8")
    new = render_recorded(text, args.results)
    if not args.records_only:
        new = run_rendered(new, args)
    if new == text:
        print(f"{args.readme}: up to date")
        return 0
    diff = difflib.unified_diff(text.splitlines(), new.splitlines(), "README.md", "regenerated", lineterm="")
    print("\n".join(diff))
    if args.check:
        return 1
    args.readme.write_text(new, encoding="utf-8")
    print(f"{args.readme}: rewritten")
    return 0


def run_rendered(text: str, args: argparse.Namespace) -> str:
    """The outputs and figures that come from running README's commands on the quick-start run."""
    cwd = Path.cwd()
    if args.train:
        train, _ = quickstart(text)
        run([*train, "--run-dir", args.run_dir, "--resume", "never"], cwd=cwd)
    if not (Path(args.run_dir) / "export" / "latest").is_file():
        raise SystemExit(
            f"{args.run_dir} has no export/latest: train it first (--train), or pass --records-only"
        )
    new = text
    for name, content in outputs(text, cwd=cwd, run_dir=args.run_dir).items():
        new = replace_block(new, name, content)
    if not args.no_figures:
        new = replace_figure(new, "padding", padding_figure(cwd=cwd, cache_dir=args.cache_dir))
        if "<!-- figure: cpu-eval -->" in new:
            new = replace_figure(new, "cpu-eval", cpu_eval_figure(cwd=cwd, run_dir=args.run_dir))
    return new


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
