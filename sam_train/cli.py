"""`sam-train`: thin command-line entry points over the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from sam_train.config import load_config
    from sam_train.demo import run_demo

    result = run_demo(load_config("demo", args.overrides))
    print(f"model        {result['model']} ({result['parameters'] / 1e6:.2f}M parameters), weights: {result['weights']}")
    print(f"image encode {result['encode_ms']:.1f} ms (once per image)")
    print(f"prompt       {result['decode_ms']:.1f} ms (point -> 3 masks, per click)")
    print(f"mask IoU vs ground truth: point {result['point_iou']:.3f}, box {result['box_iou']:.3f}")
    print(f"overlay      {result['overlay']}  (ground truth | point prompt | box prompt)")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from sam_train.config import load_config
    from sam_train.train import fit

    run_dir = fit(load_config("fit", args.overrides))
    print(f"run folder: {run_dir}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from sam_train.config import load_config
    from sam_train.validate import format_metrics, validate

    cfg = load_config("fit", args.overrides)
    report = validate(cfg)
    print(format_metrics(report["metrics"]))
    print(f"metrics: {Path(cfg.validate_out) / 'metrics.json'}")
    return 0


def _cmd_checkpoint_export(args: argparse.Namespace) -> int:
    from sam_train.model import build_sam, export_official

    model = build_sam(args.model, checkpoint=args.src)
    path = export_official(model, args.dst)
    print(f"wrote {path} ({args.model}, Meta's official key layout)")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from sam_train.model import MODEL_SPECS, build_sam

    print(f"{'name':8} {'parameters':>12} {'input':>6} {'embedding':>14}  backbone")
    for name, spec in MODEL_SPECS.items():
        with torch.device("meta"):  # count parameters without allocating them
            count = sum(p.numel() for p in build_sam(name).parameters())
        emb = f"{spec.embedding_size}x{spec.embedding_size}x{spec.prompt_dim}"
        print(f"{name:8} {count / 1e6:>11.1f}M {spec.image_size:>6} {emb:>14}  {spec.backbone}")
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from sam_train.data.synth import synth_dataset

    manifest = synth_dataset(args.out, args.images, args.seed, args.samples_per_shard, args.workers, args.style)
    print(f"{manifest['total_samples']} synthetic samples in {len(manifest['shards'])} shards -> {args.out}")
    return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from sam_train.data import convert

    if args.source == "sa1b":
        report = convert.convert_sa1b_folder(args.src, args.out, args.samples_per_shard)
    elif args.source == "coco":
        report = convert.convert_coco(args.annotations, args.src, args.out, args.samples_per_shard)
    else:
        report = convert.convert_mask_folder(args.src, args.masks, args.out, args.samples_per_shard)
    for item, reason in report.skipped:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    manifest = report.manifest
    print(f"{manifest['total_samples']} samples in {len(manifest['shards'])} shards -> {args.out} ({len(report.skipped)} skipped)")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from sam_train.data.check import check_shards

    summary = check_shards([str(s) for s in args.shards])
    return 1 if summary.bad else 0


def _cmd_data_show(args: argparse.Namespace) -> int:
    from sam_train.data.check import show_sample

    print(f"wrote {show_sample(str(args.shard), args.key, args.out)}")
    return 0


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="datasets: synthesise, convert, check, show").add_subparsers(
        dest="action", required=True
    )
    synth = data.add_parser("synth", help="write the built-in synthetic SA-1B-style dataset")
    synth.add_argument("out", type=Path)
    synth.add_argument("--images", type=int, default=1000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--samples-per-shard", type=int, default=100)
    synth.add_argument("--workers", type=int, default=0, help="processes drawing images (0 = one per core)")
    synth.add_argument("--style", default="objects", choices=["objects", "cells"],
                       help="scene style: objects (the built-in model's domain) or cells (microscopy-like)")
    synth.set_defaults(func=_cmd_data_synth)

    convert = data.add_parser("convert", help="convert a dataset to SA-1B-style shards + manifest (resumable)")
    convert.add_argument("source", choices=["sa1b", "coco", "masks"])
    convert.add_argument("src", type=Path, help="sa1b: extracted folder; coco: images folder; masks: images folder")
    convert.add_argument("out", type=Path)
    convert.add_argument("--annotations", type=Path, help="coco: instances JSON")
    convert.add_argument("--masks", type=Path, help="masks: folder of instance-label PNGs, same stems as the images")
    convert.add_argument("--samples-per-shard", type=int, default=1000)
    convert.set_defaults(func=_cmd_data_convert)

    check = data.add_parser("check", help="validate every sample; one line per bad sample; exit 1 if any")
    check.add_argument("shards", nargs="+", type=Path, help="dataset folders, folders of tars, or tar files")
    check.set_defaults(func=_cmd_data_check)

    show = data.add_parser("show", help="draw a sample's masks over its image")
    show.add_argument("shard", type=Path)
    show.add_argument("--key", required=True)
    show.add_argument("--out", type=Path, required=True)
    show.set_defaults(func=_cmd_data_show)


def build_parser() -> argparse.ArgumentParser:
    """The `sam-train` argument parser."""
    parser = argparse.ArgumentParser(prog="sam-train", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="embed a synthetic image once, prompt it, write an overlay PNG",
        description="Hydra overrides of configs/demo.yaml, e.g. `model=vit_b model.checkpoint=sam_vit_b_01ec64.pth`.",
    )
    demo.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    demo.set_defaults(func=_cmd_demo)

    fit = commands.add_parser(
        "fit", help="train (Hydra overrides of configs/fit.yaml)",
        description="e.g. `sam-train fit experiment=quickstart` or `sam-train fit model=vit_b data=sa1b trainer=gpu`.",
    )
    fit.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    fit.set_defaults(func=_cmd_fit)

    validate = commands.add_parser(
        "validate", help="click-based mIoU of a checkpoint on shards (Hydra overrides of configs/fit.yaml)",
        description="e.g. `sam-train validate model=vit_b model.checkpoint=sam_vit_b_01ec64.pth data.val=[data/shards/mine]`:"
        " mIoU after 1, 3, 5 clicks and with a box, IoU-head calibration; writes <validate_out>/metrics.json.",
    )
    validate.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    validate.set_defaults(func=_cmd_validate)

    models = commands.add_parser("models", help="list the named model configurations")
    models.set_defaults(func=_cmd_models)

    _add_data_commands(commands)

    checkpoint = commands.add_parser("checkpoint", help="checkpoint conversion").add_subparsers(dest="action", required=True)
    export = checkpoint.add_parser(
        "export", help="load weights strictly and write them in Meta's official layout (.pth, or .safetensors by suffix)"
    )
    export.add_argument("src", type=Path, help="official-layout .pth or .safetensors")
    export.add_argument("dst", type=Path)
    export.add_argument("--model", required=True, help="vit_b | vit_l | vit_h | tiny")
    export.set_defaults(func=_cmd_checkpoint_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sam-train` console script."""
    args = build_parser().parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return args.func(args)
    except KeyError as exc:  # str(KeyError) would quote the message
        print(f"sam-train: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    # Bad input of every kind (CheckpointError, SampleError, ShardLayoutError, ...) is a ValueError.
    except (ValueError, FileNotFoundError, HydraException, OmegaConfBaseException) as exc:
        print(f"sam-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
