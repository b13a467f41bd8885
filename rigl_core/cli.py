"""The `rigl` command line: `rigl plan` previews per-layer sparsity, `rigl train` trains locally,
`rigl report` draws a run's charts, and the client commands talk to a running service.

Bad input exits with status 2 and one line naming the field; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from rigl_core.export.formats import EXPORT_FORMATS
from rigl_core.optional import MissingExtra, require
from rigl_core.training.recipes import recipe_names
from rigl_core.spec import METHODS, JobSpec, SparsitySpec, format_validation_error


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def _shape(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 3,32,32, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 3,32,32, got {text!r}")
    return values


def _add_sparsity_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, help="sparse-training method (default rigl)")
    p.add_argument("--sparsity", type=float, help="target sparsity over masked layers, in [0, 1)")
    p.add_argument("--distribution", choices=("uniform", "er", "erk"), help="per-layer distribution (default erk; uniform for --method gmp)")
    p.add_argument("--erk-power-scale", type=float, help="ERK exponent (default 1)")
    first = p.add_mutually_exclusive_group()
    first.add_argument("--dense-first-layer", dest="dense_first_layer", action="store_true", default=None,
                       help="keep the first layer dense (default for uniform)")
    first.add_argument("--no-dense-first-layer", dest="dense_first_layer", action="store_false",
                       help="mask the first layer too (default for er/erk)")
    p.add_argument("--include", action="append", help="glob of module names to mask (repeatable)")
    p.add_argument("--exclude", action="append", help="glob of module names to keep dense (repeatable)")
    p.add_argument("--hidden-sizes", type=_shape, help="mlp hidden widths, e.g. 300,100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rigl", description="Sparse training with RigL (Evci et al., 2020).")
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="print the per-layer sparsity plan without training")
    model = plan.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="mlp, lenet5, wrn-22-2, resnet18-cifar, vit-tiny, vit-small or a torchvision model name")
    model.add_argument("--architecture", type=Path, help="declarative JSON architecture file")
    model.add_argument("--hf", help="a Hugging Face config (model.hf) as JSON, or a .json file holding it")
    model.add_argument("--program", type=Path, help="a torch.export program (.pt2): its input shape and classes "
                       "are its own")
    plan.add_argument("--task", default="auto", choices=["auto", "classification", "sequence-classification",
                                                         "causal-lm"], help="training.task (model.hf: its head)")
    plan.add_argument("--num-classes", type=int, help="output classes (default 10 for built-ins, 1000 otherwise)")
    plan.add_argument("--input-shape", type=_shape, help="C,H,W (default 1,28,28 for built-ins, 3,224,224 otherwise)")
    plan.add_argument("--config", type=Path, help="take the sparsity section from a JobSpec file (.json/.yaml)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan.add_argument("--total-steps", type=int,
                      help="training steps of the run: resolves delta_t auto and warns about too few mask updates")
    plan.add_argument("--delta-t", type=_int_or("auto"), help="steps between mask updates (ΔT), or auto")
    _add_set_flag(plan, "a sparsity.* or model.* JobSpec field, e.g. --set sparsity.erk_power_scale=0.8")
    _add_sparsity_flags(plan)

    train = sub.add_parser("train", help="train locally and write report, metrics and exports to --out")
    train.add_argument("--config", type=Path, help="JobSpec file (.json/.yaml); flags override it")
    _add_set_flag(train, "any JobSpec field, e.g. --set sparsity.schedule.delta_t=25 --set dataset.download=true")
    train.add_argument("--recipe", help="paper setting that fills every field not given (the file and flags win): "
                                        + ", ".join(recipe_names()) + "; `rigl recipes` shows them")
    train.add_argument("--model", help="mlp, lenet5, wrn-22-2, resnet18-cifar, vit-tiny, vit-small or a torchvision model name")
    train.add_argument("--architecture", type=Path, help="declarative JSON architecture file (instead of --model)")
    train.add_argument("--program", type=lambda text: str(Path(text).expanduser()),
                       help="a torch.export program (.pt2) to train (instead of --model)")
    train.add_argument("--dataset", help="digits, mnist1d, synthetic, mnist, fashion-mnist, cifar10, cifar100, "
                                         "imagefolder or tensors")
    train.add_argument("--data-dir", help="directory with mnist/cifar files or images")
    train.add_argument("--data-path", help="imagefolder folder or .npz/.safetensors file")
    train.add_argument("--epochs", type=int)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--optimizer", choices=("sgd", "nesterov", "adam", "adamw"))
    train.add_argument("--lr", type=float)
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    train.add_argument("--devices", type=_int_or("all"),
                       help="train on N GPUs (or 'all') as one DistributedDataParallel job; N CPU processes on CPU")
    train.add_argument("--accumulate-steps", type=_int_or("auto"),
                       help="micro-batches per step (batch size is the global batch), or 'auto'")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                       help="mixed precision (default auto: bf16 on a GPU that has it, else fp32)")
    train.add_argument("--clip-grad-norm", type=float, help="clip the global gradient norm to this")
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    train.add_argument("--delta-t", type=_int_or("auto"),
                       help="steps between mask updates (ΔT), or auto (scaled to the run's length)")
    train.add_argument("--alpha", type=float, help="initial drop fraction α")
    train.add_argument("--t-end", type=float, help="last mask update as a fraction of training")
    train.add_argument("--weights", type=lambda text: str(Path(text).expanduser()),
                       help="start from this trained model: a .safetensors state_dict of the same model")
    train.add_argument("--init", choices=("random", "magnitude"),
                       help="first masks: random (default) or magnitude (one-shot pruning of --weights)")
    train.add_argument("--out", type=Path, required=True, help="output directory")
    train.add_argument("--checkpoint-every", type=int, default=0, help="write DIR/checkpoint.pt every N steps")
    train.add_argument("--resume", type=Path, help="resume from a checkpoint written by --checkpoint-every")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_sparsity_flags(train)
    fields = sub.add_parser("fields", help="list every JobSpec field (what --set and job files accept)")
    fields.add_argument("prefix", nargs="?", default="", help="only fields starting with this, e.g. dataset.")
    fields.set_defaults(handler=cmd_fields)
    recipes = sub.add_parser("recipes", help="list the paper recipes and the fields each one fills")
    recipes.add_argument("--json", action="store_true", help="print {name: {description, defaults}} as JSON")
    recipes.set_defaults(handler=cmd_recipes)
    _add_client_commands(sub)
    _add_report_command(sub)
    _add_plugin_commands(sub)
    return parser


def _add_report_command(sub) -> None:
    report = sub.add_parser("report", help="render a run's charts to a PNG (a --out directory, a job or sweep id)")
    report.add_argument("source", metavar="SOURCE",
                        help="a `rigl train --out` directory, or a job or sweep id on the service (RIGL_API_URL)")
    report.add_argument("--png", type=Path, help="write the figure here")
    report.add_argument("--json", action="store_true", help="print the normalised report data as JSON")
    report.set_defaults(handler=cmd_report)


def _add_client_commands(sub) -> None:
    """Commands that talk to a running service (RIGL_API_URL, RIGL_API_KEY)."""
    submit = sub.add_parser("submit", help="submit a JobSpec file (.json/.yaml) to the service")
    submit.add_argument("file", type=Path)
    _add_set_flag(submit, "change a field of FILE before sending it, e.g. --set training.epochs=5")
    submit.add_argument("--wait", action="store_true", help="then follow it with a progress bar")
    submit.add_argument("--name", help="a label for the job (lists, dashboard)")
    submit.add_argument("--tag", action="append", dest="tags", metavar="TAG", help="a tag (repeatable); "
                        "`rigl jobs --tag` filters by one")
    _add_metadata_flag(submit, "a metadata entry (repeatable; VALUE is text); `rigl jobs --metadata` filters by it")
    submit.set_defaults(handler=cmd_submit)
    label = sub.add_parser("label", help="edit a job's name, tags or metadata (what is not given stays)")
    label.add_argument("job_id")
    label.add_argument("--name", help="the new name")
    label.add_argument("--tag", action="append", dest="tags", metavar="TAG",
                       help="the new tags (repeatable; replaces the job's tags)")
    label.add_argument("--no-tags", action="store_true", help="remove every tag")
    _add_metadata_flag(label, "set a metadata entry (repeatable; VALUE is text; other keys stay)")
    label.add_argument("--drop-metadata", action="append", default=[], metavar="KEY", help="delete a metadata key "
                       "(repeatable)")
    label.set_defaults(handler=cmd_label)
    status = sub.add_parser("status", help="show a job")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)
    watch = sub.add_parser("watch", help="live progress bar (loss, accuracy) until the job ends")
    watch.add_argument("job_id")
    watch.set_defaults(handler=cmd_watch)
    cancel = sub.add_parser("cancel", help="cancel a job (it checkpoints and stops within about a second)")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=cmd_cancel)
    download = sub.add_parser("download", help="download a job's sparse checkpoint")
    download.add_argument("job_id")
    download.add_argument("--format", choices=EXPORT_FORMATS, default="dense",
                          help="condensed: jobs trained with sparsity.structure fan-in (method srigl)")
    download.add_argument("--out", type=Path, help="file or directory (default: the server's file name, reduced to a safe base name, here)")
    download.set_defaults(handler=cmd_download)
    register = sub.add_parser("register", help="register a finished job's model in MLflow's model registry")
    register.add_argument("job_id")
    register.add_argument("name", help="the registered model's name (created when missing)")
    register.add_argument("--json", action="store_true")
    register.set_defaults(handler=cmd_register)
    sweep = sub.add_parser("sweep", help="submit a sweep file ({base, grid, name}) to the service")
    sweep.add_argument("file", type=Path)
    sweep.add_argument("--wait", action="store_true", help="then poll until every child ended and print the table")
    sweep.add_argument("--poll", type=float, default=2.0, help="seconds between polls with --wait")
    sweep.set_defaults(handler=cmd_sweep)
    jobs = sub.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--status")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--tag", help="only jobs with this tag")
    jobs.add_argument("--name-prefix", help="only jobs whose name starts with this (case-sensitive)")
    jobs.add_argument("--method", help="only jobs of this sparsity method")
    _add_metadata_flag(jobs, "only jobs whose metadata KEY is VALUE (repeatable: all must hold)")
    jobs.set_defaults(handler=cmd_jobs)
    usage = sub.add_parser("usage", help="what you store on the service against your storage quotas")
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(handler=cmd_usage)


def _client():
    from rigl_core.client import Client

    # A person at a terminal: a server that is not there is said within about 2 s (0.5 + 1 s of backoff),
    # not after the library's 15 s of retries meant for a server that is restarting.
    return Client(retries=int(os.environ.get("RIGL_CLI_RETRIES", "2")))


def _job_line(job) -> str:
    d = job.data
    p = d["progress"]
    sparsity = d.get("spec", {}).get("sparsity", {})
    result = d.get("result") or {}
    accuracy = (result.get("final_metrics") or {}).get("val_accuracy") or (d.get("metrics") or {}).get("val_accuracy")
    line = (f"{d['id']}  {d['status']:<10} {p['step']:>7}/{p['total_steps']:<7} "
            f"{sparsity.get('method', 'rigl'):<6} S={sparsity.get('sparsity', 0.9)}")
    line += f"  val_accuracy {accuracy:.4f}" if accuracy is not None else ""
    labels = " ".join(([repr(d["name"])] if d.get("name") else []) + [f"#{tag}" for tag in d.get("tags") or []])
    return line + (f"  {labels}" if labels else "")


def _add_metadata_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", dest="metadata",
                        type=_metadata_entry, help=what)


def _metadata_entry(text: str) -> tuple[str, str]:
    """`--metadata KEY=VALUE`: VALUE stays text (a version `1.10` is not the number 1.1)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as team=vision, got {text!r}")
    return key, value


def cmd_submit(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise UsageError(f"file: {args.file} does not exist")
    body = _apply_sets(_read_config(args.file, flag=None), args.set_fields)
    body.update({k: v for k, v in (("name", args.name), ("tags", args.tags)) if v})  # labels beside the spec
    if args.metadata:  # added to the file's own metadata
        body["metadata"] = {**(body.get("metadata") or {}), **dict(args.metadata)}
    job = _client().submit(body)
    print(job.id)
    if args.wait:
        return _follow(job.id)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    changes: dict = {}
    if args.name is not None:
        changes["name"] = args.name
    if args.tags or args.no_tags:
        changes["tags"] = [] if args.no_tags else args.tags
    metadata = {**{key: None for key in args.drop_metadata}, **dict(args.metadata)}
    if metadata:
        changes["metadata"] = metadata
    if not changes:
        raise UsageError("label: give --name, --tag, --no-tags, --metadata or --drop-metadata")
    print(_job_line(_client().label(args.job_id, **changes)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    job = _client().get(args.job_id)
    print(json.dumps(job.data, indent=2) if args.json else _job_line(job))
    if job.data.get("error"):
        print(f"error: {job.data['error']['code']}: {job.data['error']['message']}", file=sys.stderr)
    return 0


def _follow(job_id: str) -> int:
    """The progress bar until the job ends. Ctrl-C stops watching, not the job: say so, and how to stop it."""
    try:
        job = _client().wait(job_id, progress=True)
    except KeyboardInterrupt:
        print(f"rigl: stopped watching {job_id}; the job keeps running; `rigl cancel {job_id}` stops it",
              file=sys.stderr)
        return 130
    print(_job_line(job))
    return 0 if job.status == "succeeded" else 1


def cmd_watch(args: argparse.Namespace) -> int:
    return _follow(args.job_id)


def cmd_cancel(args: argparse.Namespace) -> int:
    print(_job_line(_client().cancel(args.job_id)))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    print(_client().download(args.job_id, format=args.format, path=args.out))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    version = _client().register(args.job_id, args.name)
    print(json.dumps(version, indent=2) if args.json else
          f"{version['name']} version {version['version']} (MLflow run {version['run_id']})")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    for job in _client().list(status=args.status, limit=args.limit, tag=args.tag, name_prefix=args.name_prefix,
                              method=args.method, metadata=dict(args.metadata)):
        print(_job_line(job))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    usage = _client().usage()
    if args.json:
        print(json.dumps(usage, indent=2))
        return 0
    for kind in ("weights", "datasets", "artifacts"):
        held = usage[kind]
        size = _mib(held["bytes"]) + (f" of {_mib(held['max_bytes'])}" if held["max_bytes"] is not None else "")
        count = f"{held['count']:,}" + (f" of {held['max_count']:,}" if held["max_count"] is not None else "")
        print(f"{kind:<10} {size:<24} {count} {held['counts']}")
    return 0


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def cmd_sweep(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise UsageError(f"file: {args.file} does not exist")
    body = _read_config(args.file, flag=None)
    with _client() as client:
        sweep = client.submit_sweep(body)
        print(sweep["id"])
        if not args.wait:
            return 0
        seen = [None]

        def show(state: dict) -> None:
            p = state["progress"]
            counts = ", ".join(f"{status} {n}" for status, n in p["by_status"].items())
            line = f"{state['id']} {state['status']}: {p['finished']}/{p['total']} finished ({counts})"
            if line != seen[0]:
                print(line, file=sys.stderr)
                seen[0] = line

        sweep = client.wait_sweep(sweep["id"], poll=args.poll, on_update=show)
    print(format_sweep_table(sweep))
    return 0 if all(c["status"] == "succeeded" for c in sweep["children"]) else 1


def format_sweep_table(sweep: dict) -> str:
    """The aggregate as text: one row per (method, distribution, sparsity); * marks the frontiers."""
    lines = [f"{'method':<7} {'dist':<8} {'sparsity':>8} {'n':>3} {'val_accuracy':>17} {'flops':>7} "
             f"{'packed bytes':>13}  frontier"]
    for g in sweep["aggregate"]:
        acc = g["val_accuracy"]
        text = "-" if acc["mean"] is None else f"{acc['mean']:.4f}" + (
            f" ± {acc['sd']:.4f}" if acc["sd"] is not None else "")
        flops = "-" if g["inference_flops_ratio"] is None else f"{g['inference_flops_ratio']:.3f}"
        size = "-" if g["packed_bytes"] is None else f"{g['packed_bytes']:,.0f}"
        marks = ",".join(name for name, on in (g.get("on_frontier") or {}).items() if on)
        lines.append(f"{g['method']:<7} {g['distribution']:<8} {g['sparsity']:>8} {g['succeeded']:>3} {text:>17} "
                     f"{flops:>7} {size:>13}  {marks}")
    return "\n".join(lines)


def _is_job_id(source: str) -> bool:
    """Service job ids are `job_` + hex; anything else (or an existing path) is a local directory, so a
    mistyped directory gets "does not exist", not a connection error."""
    return source.startswith("job_") and not Path(source).exists()


def cmd_report(args: argparse.Namespace) -> int:
    from rigl_core.report.data import ReportSourceError, from_output_dir, from_service

    if args.png is None and not args.json:
        raise UsageError("--png: required (or --json to print the data)")
    if args.png is not None and args.png.is_dir():
        raise UsageError(f"--png: {args.png} is a directory; give a file name like report.png")
    if args.source.startswith("sweep_") and not Path(args.source).exists():
        return _report_sweep(args)
    try:
        if _is_job_id(args.source):
            with _client() as client:
                data = from_service(client, args.source)
        else:
            data = from_output_dir(args.source)
    except ReportSourceError as exc:
        raise UsageError(str(exc)) from None
    return _print_report(args, data, "render")


def _report_sweep(args: argparse.Namespace) -> int:
    """`rigl report sweep_…`: the sweep's accuracy against FLOPs and size, with the Pareto frontiers."""
    with _client() as client:
        sweep = client.sweep(args.source)
    return _print_report(args, sweep, "render_sweep")


def _print_report(args: argparse.Namespace, data: dict, renderer: str) -> int:
    """--json prints the data; --png draws it with rigl_core.report.png.<renderer> and prints the path."""
    if args.json:
        print(json.dumps(data, indent=2))
    if args.png is not None:
        from rigl_core.report import png as report_png

        try:
            path = getattr(report_png, renderer)(data, args.png)
        except OSError as exc:
            raise UsageError(f"--png: cannot write {args.png}: {exc.strerror or exc}") from None
        if not args.json:
            print(path)
    return 0


def _add_plugin_commands(sub) -> None:
    """`rigl serve`, `rigl worker`, … come from the service packages through entry points, so
    rigl_core never imports them."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="rigl.commands"):
        try:
            entry.load()(sub)
        except ImportError as exc:  # the service's dependencies are optional for library users
            print(f"rigl: note: command {entry.name!r} unavailable: {exc}", file=sys.stderr)


def _read_config(path: Path, flag: str | None = "--config") -> dict:
    """A JobSpec-shaped .json/.yaml file; errors name the file (after `flag`, the option that gave it,
    when there is one) and where in it the parse failed."""
    where = f"{flag}: {path}" if flag else str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"{where}: cannot read: {exc.strerror}") from None
    yaml = require("yaml", "client", "reading a YAML JobSpec") if path.suffix in (".yaml", ".yml") else None
    try:
        if yaml is not None:
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except Exception as exc:  # noqa: BLE001 - any YAML parse error is the user's file
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"{where} is not valid YAML: {getattr(exc, 'problem', None) or exc}{at}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{where} must hold a mapping with sections model, dataset, sparsity, training")
    return data


def _add_set_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="set_fields",
                        help=f"{what} (VALUE is read as JSON, else as text; applied after the other flags; "
                             "repeatable; `rigl fields` lists them all)")


def _apply_sets(tree: dict, assignments: list[str], sections: tuple[str, ...] | None = None) -> dict:
    """Apply `--set FIELD=VALUE` assignments to a JobSpec-shaped dict (only `sections` when given)."""
    for assignment in assignments:
        dotted, value = _parse_assignment(assignment)
        if sections is not None and dotted.split(".")[0] not in sections:
            raise UsageError(f"--set: {dotted} does not apply here; use fields under "
                             + " or ".join(f"{section}." for section in sections))
        _set(tree, dotted, value)
    return tree


def _parse_assignment(text: str) -> tuple[str, object]:
    """`--set a.b=VALUE`: VALUE as JSON (numbers, true/false, null, lists, objects), else as text."""
    dotted, sep, raw = text.partition("=")
    if not sep or not dotted or any(not part for part in dotted.split(".")):
        raise UsageError(f"--set: expected FIELD=VALUE such as sparsity.schedule.delta_t=25, got {text!r}")
    try:
        return dotted, json.loads(raw)
    except json.JSONDecodeError:
        return dotted, raw


def _set(tree: dict, dotted: str, value) -> None:
    if value is None:
        return
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UsageError(f"--config: section {key!r} must be a mapping")
    node[leaf] = value


SPARSITY_FLAGS = {
    "method": "sparsity.method",
    "sparsity": "sparsity.sparsity",
    "distribution": "sparsity.distribution",
    "erk_power_scale": "sparsity.erk_power_scale",
    "dense_first_layer": "sparsity.dense_first_layer",
    "include": "sparsity.include",
    "exclude": "sparsity.exclude",
    "hidden_sizes": "model.hidden_sizes",
}

TRAIN_FLAGS = {
    "recipe": "recipe",
    "model": "model.name",
    "dataset": "dataset.name",
    "epochs": "training.epochs",
    "max_steps": "training.max_steps",
    "batch_size": "training.batch_size",
    "optimizer": "training.optimizer",
    "lr": "training.lr",
    "weight_decay": "training.weight_decay",
    "seed": "training.seed",
    "device": "training.device",
    "devices": "training.devices",
    "accumulate_steps": "training.accumulate_steps",
    "precision": "training.precision",
    "clip_grad_norm": "training.clip_grad_norm",
    "compile": "training.compile",
    "data_dir": "dataset.data_dir",
    "data_path": "dataset.path",
    "delta_t": "sparsity.schedule.delta_t",
    "alpha": "sparsity.schedule.alpha",
    "t_end": "sparsity.schedule.t_end",
    "weights": "model.weights",
    "program": "model.program",
    "init": "sparsity.init",
}


def _int_or(word: str):
    """argparse type for `N | word` flags (the spec validates the range and names the field)."""
    def parse(text: str) -> int | str:
        return text if text == word else int(text)

    parse.__name__ = f"integer or '{word}'"
    return parse


def _read_architecture(path: Path) -> dict:
    data = _read_config(path, "--architecture") if path.suffix in (".yaml", ".yml") else None
    if data is None:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise UsageError(f"--architecture: cannot read {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"--architecture: {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--architecture: {path} must hold an object with input_shape and layers")
    return data


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    tree = _read_config(args.config) if args.config else {}
    if args.architecture is not None:
        model = tree.setdefault("model", {})
        model["architecture"] = _read_architecture(args.architecture)
        model.setdefault("name", "custom")
    for flag, dotted in {**SPARSITY_FLAGS, **TRAIN_FLAGS}.items():
        _set(tree, dotted, getattr(args, flag, None))
    _apply_sets(tree, getattr(args, "set_fields", []))
    for section in ("model", "dataset"):
        if section not in tree and tree.get("recipe") is None:  # a recipe names both
            raise UsageError(f"{section}: missing; pass --{section if section == 'model' else 'dataset'} or --config")
    dataset = tree["dataset"] if isinstance(tree.get("dataset"), dict) else {}
    for key in ("data_dir", "path"):  # a local run's own paths: `~` is expanded here, never by the loaders
        if isinstance(dataset.get(key), str):
            dataset[key] = os.path.expanduser(dataset[key])
    return JobSpec.model_validate(tree)


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and key in ("model", "dataset", "sparsity", "schedule", "training"):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows


def cmd_recipes(args: argparse.Namespace) -> int:
    """Every registered recipe: name, what it reproduces, and each field it fills (dotted, as JSON)."""
    from rigl_core.training.recipes import RECIPES

    if args.json:
        print(json.dumps({name: {"description": r.description, "defaults": r.defaults}
                          for name, r in sorted(RECIPES.items())}, indent=2))
        return 0
    for name, recipe in sorted(RECIPES.items()):
        print(f"{name}\n  {recipe.description}")
        for dotted, value in _flatten(recipe.defaults):
            print(f"    {dotted} = {json.dumps(value)}")
        print()
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from rigl_core.models.registry import build_model, check_model, default_input_shape, default_num_classes
    from rigl_core.sparse.plan import make_plan

    tree = _read_config(args.config).get("sparsity", {}) if args.config else {}
    for flag, dotted in SPARSITY_FLAGS.items():
        if dotted.startswith("sparsity."):
            _set(tree, dotted.removeprefix("sparsity."), getattr(args, flag))
    _set(tree, "schedule.delta_t", args.delta_t)
    chosen = _apply_sets({"sparsity": tree}, args.set_fields, ("sparsity", "model"))
    sparsity = _validated(SparsitySpec, chosen["sparsity"], "sparsity")
    from rigl_core.spec import ModelSpec

    model_sets = chosen.get("model", {})  # --set model.*: the flags below win where both are given
    if args.architecture is not None:
        model_spec = _validated(ModelSpec, {**model_sets, **_given(
            architecture=_read_architecture(args.architecture), num_classes=args.num_classes,
            input_shape=args.input_shape)}, "model")
        input_shape = model_spec.architecture.input_shape
        from rigl_core.models.build import infer

        num_classes = model_spec.num_classes or infer(model_spec.architecture)[1][-1]
    elif args.program is not None:  # the program fixes both: its example input and its logits
        model_spec = _validated(ModelSpec, {**model_sets, **_given(program=str(args.program.expanduser()),
                                                                   num_classes=args.num_classes)}, "model")
        program = build_model("program", model_spec.num_classes, args.input_shape, device="meta",
                              program=model_spec.program)
        input_shape, num_classes = program.input_shape, program.program_classes
    else:
        hf = _read_hf(args.hf) if args.hf is not None else None
        model_spec = _validated(ModelSpec, {**model_sets, **_given(
            name=args.model or "hf", hf=hf, num_classes=args.num_classes, input_shape=args.input_shape,
            hidden_sizes=args.hidden_sizes)}, "model")
        input_shape = model_spec.input_shape or default_input_shape(model_spec.name)
        num_classes = model_spec.num_classes or default_num_classes(model_spec.name)
    from rigl_core.models.registry import resolve_task

    task = resolve_task(args.task, model_spec.hf)
    model = program if args.program is not None else build_model(
        model_spec.name, num_classes, input_shape, model_spec.hidden_sizes, device="meta",
        architecture=model_spec.architecture, hf=model_spec.hf, task=task)
    check_model(model, input_shape, num_classes, task)
    schedule_warnings = []
    if args.total_steps is not None:  # the run's length fixes T_end, ΔT "auto" and the update count
        from rigl_core.sparse.schedules import update_schedule, with_delta_t

        if args.total_steps < 1:
            raise UsageError("--total-steps: at least 1")
        schedule, schedule_warnings = update_schedule(sparsity, args.total_steps)
        sparsity = with_delta_t(sparsity, schedule.delta_t)
    plan = make_plan(model, input_shape, sparsity)
    result = {"model": model_spec.name, "input_shape": input_shape, "num_classes": num_classes, **plan.to_dict()}
    if args.total_steps is not None:
        result["schedule"] = {"total_steps": args.total_steps, "t_end": schedule.t_end, "delta_t": schedule.delta_t,
                              "mask_updates": schedule.update_count(), "warnings": schedule_warnings}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_plan_table(result))
    _warn_partial_sparsity(result)
    for warning in result["warnings"] + schedule_warnings:  # large weights left dense; too few mask updates
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _validated(model, data: dict, section: str):
    """Validate one JobSpec section alone, naming fields by their full path (`sparsity.sparsity`)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        parts = format_validation_error(exc).split("; ")
        raise UsageError("; ".join(p if p.startswith(section + ".") else f"{section}.{p}" for p in parts)) from None


def _given(**values) -> dict:
    """The keyword arguments that were actually given (flags left out are None)."""
    return {key: value for key, value in values.items() if value is not None}


def cmd_fields(args: argparse.Namespace) -> int:
    """Every JobSpec field with its type and default: the same rows as README's reference."""
    from rigl_core.docs import fields

    rows = [row for row in fields() if row[0].startswith(args.prefix)]
    if not rows:
        raise UsageError(f"prefix: no JobSpec field starts with {args.prefix!r}")
    width = max(len(row[0]) for row in rows)
    for name, type_name, default, description in rows:
        plain = (f"{type_name}, default {default}").replace("`", "").replace("\\|", "|")
        print(f"{name:<{width}}  {plain}" + (f"\n{'':<{width}}  {description}" if description else ""))
    return 0


def _read_hf(value: str) -> dict:
    """--hf: inline JSON, or a .json file holding the model.hf mapping."""
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text()
        except OSError as exc:
            raise UsageError(f"--hf: cannot read {value}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--hf: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError("--hf: must be a JSON object such as {\"model_type\": \"bert\", ...}")
    return data


def format_plan_table(plan: dict) -> str:
    lines = [f"{'layer':<32} {'shape':<20} {'params':>11} {'density':>8} {'flops_sparse':>14}  note"]
    for row in plan["layers"]:
        lines.append(
            f"{row['name']:<32} {'x'.join(map(str, row['shape'])):<20} {row['params']:>11,} "
            f"{row['density']:>8.4f} {row['flops_sparse']:>14,}  {'' if row['reason'] == 'masked' else row['reason']}"
        )
    t = plan["totals"]
    lines.append(
        f"sparsity {t['sparsity']:.4f} over masked layers ({t['masked_params']:,} of {t['params']:,} weights); "
        f"whole network {t['overall_sparsity']:.4f}; inference FLOPs {t['inference_flops_ratio']:.3f}x dense; "
        f"training FLOPs {t['training_flops_ratio']:.3f}x dense ({plan['method']})"
    )
    return "\n".join(lines)


def _warn_partial_sparsity(plan: dict) -> None:
    """Say it out loud when unmasked layers make the whole network much denser than the target."""
    t = plan["totals"]
    if plan["method"] == "dense" or t["sparsity"] - t["overall_sparsity"] < 0.01:
        return
    dense = [r["name"] for r in plan["layers"] if not r["masked"]]
    kept = (f"{len(dense)} layer(s) kept dense ({', '.join(dense[:4])}{'…' if len(dense) > 4 else ''}) and "
            if dense else "")
    print(
        f"note: {kept}biases, norms and embeddings are never masked; whole-network sparsity is "
        f"{t['overall_sparsity']:.3f} while the masked layers are {t['sparsity']:.3f}",
        file=sys.stderr,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from rigl_core.training.run import run_training

    spec = spec_from_args(args)
    tracker = _mlflow_tracker(spec)
    if tracker is not None:
        tracker.start()  # the run opens while the data loads and the model is built
    try:
        report = run_training(
            spec,
            args.out,
            progress=not args.no_progress,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            callbacks=[tracker] if tracker is not None else [],
        )
    except BaseException:
        if tracker is not None:
            tracker.finish("cancelled" if sys.exc_info()[0] is KeyboardInterrupt else "failed", timeout=30)
        raise
    if tracker is not None:
        from rigl_core.integrations.mlflow import run_files

        files, onnx, extra = run_files(p for p in sorted(Path(args.out).iterdir())
                                       if p.name == "report.json" or p.name.startswith("model."))
        tracker.finish("succeeded", report, files, onnx, extra)
        if tracker.info() is not None:
            print(f"MLflow run {tracker.info()['run_id']} in experiment {tracker.info()['experiment']!r}")
    _warn_partial_sparsity(report)
    for warning in report.get("schedule_warnings", []):  # too few mask updates for the method to work
        print(f"warning: {warning}", file=sys.stderr)
    m = report["final_metrics"]
    print(
        f"{spec.sparsity.method} {report['totals']['sparsity']:.3f} sparse: val_accuracy "
        f"{m.get('val_accuracy', float('nan')):.4f}, {report['steps']} steps in {report['train_seconds']:.1f}s "
        f"-> {args.out}"
    )
    check = report.get("export") or {}
    if check.get("change"):  # export.values fp16/bf16: what the half-precision exports cost
        print("exports store " + check["values"] + " values: " + ", ".join(
            f"{k} {check['metrics'][k]:.4f} ({v:+.4f})" for k, v in check["change"].items()))
    return 0


def _mlflow_tracker(spec):
    """An MLflow callback when the JobSpec's tracking.mlflow or MLFLOW_TRACKING_URI names a tracking server."""
    from rigl_core.integrations.mlflow import MlflowCallback, resolve_target

    tracking = spec.tracking.model_dump(mode="json") if spec.tracking is not None else None
    target = resolve_target(tracking, os.environ.get("MLFLOW_TRACKING_URI"),
                            os.environ.get("MLFLOW_EXPERIMENT_NAME") or "rigl")
    if target is None:
        return None
    return MlflowCallback(target, params=spec.model_dump(mode="json", exclude={"tracking"}),
                          tags={"rigl.method": spec.sparsity.method, "rigl.sparsity": spec.sparsity.sparsity},
                          warn=lambda message: print(f"warning: {message}", file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "handler", None) is not None:
            return args.handler(args)
        if args.command == "plan":
            return cmd_plan(args)
        return cmd_train(args)
    except ValidationError as exc:
        print(f"rigl: error: {format_validation_error(exc)}", file=sys.stderr)
    except MissingExtra as exc:  # a feature whose optional dependency is not installed: name the extra
        print(f"rigl: error: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - client errors from the service, shown as one line
        from rigl_core.client import AuthError, RiglError, Unavailable

        if not isinstance(exc, (RiglError, UsageError, ValueError)):
            raise
        print(f"rigl: error: {exc}", file=sys.stderr)
        if isinstance(exc, AuthError) and exc.status == 401:
            what = ("RIGL_API_KEY was refused: check it" if os.environ.get("RIGL_API_KEY")
                    else "the service needs an API key: set RIGL_API_KEY")
            print(f"rigl: {what} (an admin makes one with `rigl keys create --owner NAME`)", file=sys.stderr)
        if isinstance(exc, Unavailable):  # ServiceUnreachable's message says how to start the service
            return 1
        return 2
    except KeyboardInterrupt:
        print("rigl: interrupted", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
