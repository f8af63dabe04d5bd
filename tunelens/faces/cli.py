"""The ``tunelens`` command.

    tunelens zoo list                     what the zoo has and what is built
    tunelens zoo build NAME [--force]     build a zoo model (and its base)
    tunelens info PAIR [--tuned REF]      sizes, sources, hashes and task accuracies of a pair
    tunelens check PAIR [--tuned REF]     backends agree with HF, self-patching is a no-op, no hook left
    tunelens cache PAIR --task T --sites S --out DIR    activations of a task (or --prompts FILE) into a store
    tunelens demo [--out DIR]             the main job: every analysis on the SmolLM2 pair, reduced settings
    tunelens app [RESULTS_DIR] [--port N] the Streamlit workbench on a results folder, on 127.0.0.1
    tunelens report RESULTS_DIR           one self-contained HTML file with every figure of a results folder
    tunelens jobs run JOB.yaml [--executor local|process|ray] [--fresh]   a resumable batch job
    tunelens jobs status FOLDER|JOB.yaml  units done / pending / failed
    tunelens reproduce [--out DIR]        every full-size study as one resumable batch job

PAIR is a zoo pair name (``tunelens zoo list``) or a base model reference (zoo model, HF folder, .gguf
file) given together with ``--tuned`` (a model reference or a peft adapter folder).
Errors print one line and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tunelens.errors import ConfigError, TunelensError

log = logging.getLogger("tunelens")


def _say(msg: str) -> None:
    print(msg, flush=True)


def _pair(args):
    from tunelens.models.resolve import load_pair

    return load_pair(
        args.pair, args.tuned, device=args.device, trust_remote_code=args.trust_remote_code, dtype=args.dtype
    )


def cmd_zoo_list(args) -> int:
    from tunelens.models import zoo

    _say(f"zoo folder: {zoo.zoo_dir()}")
    for name, e in zoo.ENTRIES.items():
        state = "built" if zoo.is_built(name) else "-"
        _say(f"  {name:22s} {e.kind:5s} {state:6s} {e.description}")
    _say("pairs:")
    for name, (b, t) in zoo.PAIRS.items():
        _say(f"  {name:22s} {b} -> {t}")
    return 0


def cmd_zoo_build(args) -> int:
    from tunelens.models import zoo

    t0 = time.time()
    record = zoo.build(args.name, force=args.force, progress=_say)
    _say(_format_record(record))
    _say(f"built {args.name} in {time.time() - t0:.0f} s at {zoo.path(args.name)}")
    return 0


def _format_record(record: dict) -> str:
    lines = [f"{record['name']} ({record['kind']})"]
    for split, acc in record.get("tuned_accuracy", {}).items():
        before = record["base_accuracy"][split]
        lines.append(
            f"  {split}: base {before['accuracy']:.2f} -> tuned {acc['accuracy']:.2f} "
            f"(argmax {before['argmax_accuracy']:.2f} -> {acc['argmax_accuracy']:.2f}, n={acc['n']})"
        )
    if "verdict" in record:
        lines.append(f"  verdict: {record['verdict']}")
    return "\n".join(lines)


def cmd_info(args) -> int:
    from tunelens.models import zoo

    pair = _pair(args)
    desc = pair.describe()
    _say(f"pair {desc['name']}")
    _say("  " + ", ".join(f"{k}={v}" for k, v in desc["dims"].items()))
    for role, m in desc["models"].items():
        _say(f"  {role:5s} {m['name']}  hash {m['hash']}  from {m['source']}")
    if args.pair in zoo.PAIRS:
        tuned = zoo.PAIRS[args.pair][1]
        if zoo.is_built(tuned):
            _say(_format_record(zoo.report(tuned)))
    if args.json:
        _say(json.dumps(desc, indent=2))
    return 0


def cmd_check(args) -> int:
    from tunelens.checks import check_pair

    pair = _pair(args)
    results = check_pair(pair)
    for r in results:
        _say(r.line())
    failed = [r for r in results if not r.passed]
    _say(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _task_dataset(task: str, n: int, seed: int, tokenizer):
    from tunelens.tasks import entity_tracking as et
    from tunelens.tasks.base import Dataset, Example

    if task == "entity_tracking":
        return et.generate(et.EntityTrackingConfig(n_boxes=3, n_contexts=max(1, n // 3)), seed=seed)
    if task == "context_knob":
        from tunelens.tasks import context_knob as ck

        return ck.generate(ck.ContextKnobConfig(n_items=max(1, n // 2)), seed=seed, tokenizer=tokenizer)
    path = Path(task)
    if not path.is_file():
        raise ConfigError(f"--task must be 'entity_tracking', 'context_knob' or a prompt file; got {task!r}")
    prompts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    examples = tuple(Example(prompt=p, answer=" ", item_id=str(i)) for i, p in enumerate(prompts))
    return Dataset(task=f"prompts:{path.name}", config={"file": str(path)}, examples=examples)


def cmd_cache(args) -> int:
    from tqdm import tqdm

    from tunelens.cache import CacheConfig, cache_to_store
    from tunelens.sites import Site, all_layers

    pair = _pair(args)
    sites: list[Site] = []
    for text in args.sites.split(","):
        text = text.strip()
        sites += all_layers(pair.dims, text.split(".")[0]) if "." not in text else [Site.parse(text)]
    for s in sites:
        s.validate(pair.dims)
    dataset = _task_dataset(args.task, args.n, args.seed, pair.tokenizer)
    cfg = CacheConfig(
        sites=tuple(sites),
        positions=args.positions,
        batch_size=args.batch_size,
        backend=args.backend,
        dtype=args.dtype,
    )
    with tqdm(total=None, desc="shards", unit="shard") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        stores = cache_to_store(pair, dataset, cfg, args.out, shard_size=args.shard_size, progress=progress)
    for role, store in stores.items():
        _say(
            f"{role}: {store.path} ({store.spec.n_items} items, {len(sites)} sites, "
            f"complete={store.is_complete})"
        )
    return 0


def cmd_demo(args) -> int:
    from tunelens.faces.demo import run_demo

    run_demo(Path(args.out), progress=_say, only=args.only.split(",") if args.only else None)
    return 0


def cmd_app(args) -> int:
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]  # tunelens/faces/cli.py -> the folder holding app/
    script = root / "app" / "streamlit_app.py"
    if not script.is_file():
        raise ConfigError(f"the app's script is not where tunelens expects it ({script}); reinstall tunelens")
    results = Path(args.results_dir).expanduser().resolve()
    if not results.is_dir():
        _say(f"note: results folder {results} does not exist yet; the app says so and lets you pick another")
    env = {**os.environ, "TUNELENS_RESULTS": str(results)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "streamlit", "run", str(script),
           "--server.address", "127.0.0.1", "--server.port", str(args.port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false"]  # fmt: skip
    _say(f"tunelens app on http://127.0.0.1:{args.port} (results: {results}); Ctrl-C stops it")
    return subprocess.call(cmd, env=env)


def cmd_report(args) -> int:
    from tunelens.faces.report import write_report

    path = write_report(Path(args.results_dir), out=Path(args.out) if args.out else None)
    _say(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelens", description="What did fine-tuning change inside this model?")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="the models' weights and activations (default float32; bfloat16 halves memory)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a model folder run the Python code it ships (off by default; only for folders you trust)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    zoo_p = sub.add_parser("zoo", help="list or build zoo models").add_subparsers(
        dest="zoo_command", required=True
    )
    zoo_p.add_parser("list", help="list zoo models and pairs").set_defaults(func=cmd_zoo_list)
    b = zoo_p.add_parser("build", help="build a zoo model")
    b.add_argument("name")
    b.add_argument("--force", action="store_true", help="rebuild even if built")
    b.set_defaults(func=cmd_zoo_build)

    for name, func, help_ in (
        ("info", cmd_info, "describe a pair"),
        ("check", cmd_check, "self-check a pair"),
    ):
        c = sub.add_parser(name, help=help_)
        c.add_argument("pair", help="zoo pair name, or a base model reference with --tuned")
        c.add_argument("--tuned", default=None, help="tuned model reference or peft adapter folder")
        if name == "info":
            c.add_argument("--json", action="store_true", help="also print the description as JSON")
        c.set_defaults(func=func)

    c = sub.add_parser("cache", help="cache activations of a task or a prompt file into a store")
    c.add_argument("pair")
    c.add_argument("--tuned", default=None)
    c.add_argument(
        "--task", required=True, help="entity_tracking, context_knob, or a file with one prompt a line"
    )
    c.add_argument(
        "--sites", required=True, help="comma list: 'resid_post' (all layers) or 'z.5', 'resid_pre.3'"
    )
    c.add_argument("--positions", default="last", help="last, all, or a task position such as query_label")
    c.add_argument("--n", type=int, default=300, help="number of examples (tasks only)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--shard-size", type=int, default=256)
    c.add_argument("--backend", default="bridge", choices=["bridge", "nnsight"])
    c.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    c.set_defaults(func=cmd_cache)

    d = sub.add_parser("demo", help="run every analysis on the SmolLM2 pair at reduced settings")
    d.add_argument("--out", default="results/demo", help="results folder (default results/demo)")
    d.add_argument("--only", default=None, help="comma-separated analysis steps to (re)run, e.g. probes,knob")
    d.set_defaults(func=cmd_demo)

    a = sub.add_parser("app", help="open the Streamlit workbench on a results folder (127.0.0.1 only)")
    a.add_argument(
        "results_dir", nargs="?", default="results/demo", help="results folder (default results/demo)"
    )
    a.add_argument("--port", type=int, default=8501, help="port on 127.0.0.1 (default 8501)")
    a.set_defaults(func=cmd_app)

    r = sub.add_parser("report", help="write one self-contained HTML report of a results folder")
    r.add_argument("results_dir", help="results folder (from tunelens demo or a batch job)")
    r.add_argument("--out", default=None, help="HTML file to write (default RESULTS_DIR/report.html)")
    r.set_defaults(func=cmd_report)

    from tunelens.faces.jobs.cli import add_commands as add_job_commands  # jobs run/status, reproduce

    add_job_commands(sub)
    return p


def _quiet_libraries() -> None:
    """The libraries' own progress bars and deprecation chatter hide tunelens' output; keep them quiet."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    if not args.debug:
        _quiet_libraries()
    try:
        return args.func(args)
    except TunelensError as exc:
        if args.debug:
            raise
        print(f"tunelens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
