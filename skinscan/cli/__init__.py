"""The `skinscan` command line: serve, web, worker, beat, migrate, clinics, users, submit, train, evaluate,
models."""

from __future__ import annotations

import argparse
import logging


def _setup_logging(verbose: bool = False) -> None:
    """Log INFO and up (DEBUG with -v); library chatter (Alembic's steps) only with -v."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
    from skinscan.logs import cap_library_loggers

    cap_library_loggers()


def _cmd_train(args: argparse.Namespace) -> int:
    from training.train import run_from_args

    path = run_from_args(args)
    logging.getLogger("skinscan").info("bundle written to %s", path)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, headline

    if args.name and not args.record:
        logging.getLogger("skinscan").warning("--name is only used with --record; nothing is recorded")
    report = evaluate(
        args.model, args.data, args.out, tta=args.tta, backend=args.backend, batch_size=args.batch_size,
        record=args.record, name=args.name, device=args.device, threads=args.threads,
        split_file=args.split_file, split=args.split, perturb=args.perturb,
    )
    logging.getLogger("skinscan").info("%s", headline(report))
    logging.getLogger("skinscan").info("report written to %s", args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every `skinscan` sub-command."""
    parser = argparse.ArgumentParser(prog="skinscan", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details too")
    sub = parser.add_subparsers(dest="command", required=True)

    from skinscan.cli.service import add_service_commands

    add_service_commands(sub)

    from skinscan.cli.model_versions import add_model_commands

    add_model_commands(sub)

    # Only the options here: torch and the training code are imported by the command itself (fast --help).
    from training.config import add_arguments as train_arguments

    p = sub.add_parser("train", help="train a classifier and write a model bundle")
    train_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a model bundle on a labelled dataset (report, CSV, plots)")
    p.add_argument("--model", default=None, help="bundle folder (default: the bundle shipped with SkinScan)")
    p.add_argument("--data", required=True, help="dataset folder or ground-truth CSV")
    p.add_argument("--out", required=True,
                   help="report JSON; the predictions CSV and PNG plots are written beside it")
    p.add_argument("--tta", action="store_true", help="average logits over horizontal and vertical flips")
    p.add_argument("--backend", choices=("auto", "onnx", "torch"), default="auto",
                   help="auto: torch on a GPU, else ONNX Runtime when the bundle has model.onnx")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (torch backend)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for inference (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="images per inference batch (default: %(default)s)")
    p.add_argument("--split-file", default=None,
                   help="splits.csv of a training run: evaluate only the images of --split (lesion-grouped)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which split of --split-file to evaluate (default: %(default)s)")
    p.add_argument("--perturb", action="store_true",
                   help="add the robustness report: the same images squashed, cropped and padded to square, at half "
                        "resolution, as JPEG q40, warmer, cooler, darker, brighter and with a dermoscope rim")
    p.add_argument("--record", action="store_true",
                   help="store a summary in the bundle's metadata.json under metrics.evaluations.<name>")
    p.add_argument("--name", default=None,
                   help="name of the recorded evaluation (default: the dataset's name)")
    p.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `skinscan` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    return int(args.func(args) or 0)

