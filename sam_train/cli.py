"""`sam-train`: thin command-line entry points over the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


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


def _cmd_checkpoint_export(args: argparse.Namespace) -> int:
    from sam_train.model import build_sam, export_official

    model = build_sam(args.model, checkpoint=args.src)
    path = export_official(model, args.dst)
    print(f"wrote {path} ({args.model}, Meta's official key layout)")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from sam_train.model import MODEL_SPECS, build_sam

    print(f"{'name':8} {'parameters':>12} {'input':>6} {'embedding':>14}  backbone")
    for name, spec in MODEL_SPECS.items():
        with torch.device("meta"):  # count parameters without allocating them
            count = sum(p.numel() for p in build_sam(name).parameters())
        emb = f"{spec.embedding_size}x{spec.embedding_size}x{spec.prompt_dim}"
        print(f"{name:8} {count / 1e6:>11.1f}M {spec.image_size:>6} {emb:>14}  {spec.backbone}")
    return 0


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

    models = commands.add_parser("models", help="list the named model configurations")
    models.set_defaults(func=_cmd_models)

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

    from sam_train.model import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, KeyError, HydraException, OmegaConfBaseException) as exc:
        print(f"sam-train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
