"""`sam-train`: thin command-line entry points over the library."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `sam-train --help` stays fast
    from omegaconf import DictConfig

    from sam_train.model import Sam


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
    from sam_train.report import format_metrics
    from sam_train.validate import validate

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


def _model_inputs(args: argparse.Namespace, config: str, inputs: str) -> tuple[DictConfig, Sam, list[str], str]:
    """`CKPT INPUTS... OUT [overrides]` (autolabel, embed): the composed config, the model with CKPT's
    weights (`builtin`: the package's), the inputs and OUT."""
    from sam_train.config import load_config
    from sam_train.model import build_sam

    checkpoint, *rest = args.inputs
    overrides = [a for a in rest if _is_override(a)]
    paths = [a for a in rest if not _is_override(a)]
    if len(paths) < 2:
        raise ValueError(f"{args.command} needs CKPT, at least one {inputs}, and OUT")
    *sources, out = paths
    cfg = load_config(config, [f"model={args.model}", *overrides])
    if checkpoint == "builtin":
        model = build_sam(cfg.model.name, pretrained=True)
    else:
        model = build_sam(cfg.model.name, checkpoint=checkpoint)
    return cfg, model, sources, out


def _cmd_autolabel(args: argparse.Namespace) -> int:
    from sam_train.engine.amg import autolabel_images, finish_autolabel, list_images

    cfg, model, sources, out = _model_inputs(args, "autolabel", "image or folder")
    images = list_images(sources)
    if not images:
        raise FileNotFoundError(f"no images in {', '.join(sources)}")
    if args.finalize:
        result = finish_autolabel(model, images, out, cfg, round=cfg.round, semi_automatic=args.semi_automatic)
        for item, reason in result["skipped"]:
            print(f"skipped {item}: {reason}", file=sys.stderr)
        print(f"{len(images)} images: {len(result['skipped'])} skipped;"
              f" {result['total_samples']} samples in {len(result['shards'])} shards -> {out}")
        return 0
    rank, world_size, local_rank = _launcher_ranks(args)
    model = model.to(_process_device(args.device, local_rank))
    result = autolabel_images(
        model, images, out, cfg, round=cfg.round, semi_automatic=args.semi_automatic, rank=rank, world_size=world_size
    )
    run = result["run"]
    for item, reason in run["skipped"]:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    done = f"{run['labelled']} labelled now ({run['masks']} masks), {len(run['skipped'])} skipped"
    if world_size > 1:
        print(f"rank {rank} of {world_size}, {len(images)} images: {done}; finish with --finalize once every rank is done")
    else:
        print(f"{len(images)} images: {done}; {result['total_samples']} samples in {len(result['shards'])} shards -> {out}")
    return 0


# What launchers tell each process, (rank, world size, rank on its node); torchrun's first: torchrun
# inside a SLURM job starts the processes that count.
_LAUNCHER_ENV = (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))


def _launcher_ranks(args: argparse.Namespace) -> tuple[int, int, int]:
    """(rank, world size, rank on this node): --rank/--world-size, else the launcher's variables, else (0, 1, 0)."""
    names = next((n for n in _LAUNCHER_ENV if n[0] in os.environ), None)
    rank, world_size, local_rank = (int(os.environ.get(n, d)) for n, d in zip(names, (0, 1, 0))) if names else (0, 1, 0)
    rank = rank if args.rank is None else args.rank
    world_size = world_size if args.world_size is None else args.world_size
    return rank, world_size, local_rank


def _process_device(device: str, local_rank: int) -> str:
    """`auto`: this node's local_rank-th GPU (the only one when the launcher binds one per task), else the CPU."""
    import torch

    if device != "auto":
        return device
    return f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"


def _cmd_embed(args: argparse.Namespace) -> int:
    from sam_train.embed import embed_shards, finish_embed

    cfg, model, sources, out = _model_inputs(args, "embed", "shard folder or tar")
    rank, world_size, local_rank = _launcher_ranks(args)
    if args.finalize:
        result = finish_embed(model, sources, out, cfg)
        skipped = result["skipped"]
    else:
        result = embed_shards(model.to(_process_device(args.device, local_rank)), sources, out, cfg, rank, world_size)
        skipped = result["run"]["skipped"]
    for item, reason in skipped:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    if "shards" not in result:
        print(f"rank {rank} of {world_size}: {result['run']['embedded']} embedded now, {len(skipped)} skipped;"
              " finish with --finalize once every rank is done")
    else:
        print(f"{result['total_samples']} embeddings ({', '.join(result['source']['variants'])}; {cfg.dtype})"
              f" in {len(result['shards'])} shards -> {out}; train with data.embedding_cache={out}")
    return 0


def _add_rank_options(parser: argparse.ArgumentParser) -> None:
    """--device, --rank, --world-size and --finalize of the commands whose processes share the shards they write."""
    parser.add_argument(
        "--device", default="auto", help="auto (the process's GPU on its node if there is one, else cpu) | cpu | cuda:N"
    )
    parser.add_argument("--rank", type=int, help="this process's rank (default: RANK, else SLURM_PROCID, else 0)")
    parser.add_argument(
        "--world-size", type=int, help="number of processes (default: WORLD_SIZE, else SLURM_NTASKS, else 1)"
    )
    parser.add_argument(
        "--finalize", action="store_true",
        help="after all ranks: write the manifest, or fail naming the shards still missing; compute nothing",
    )


_OVERRIDE = re.compile(r"^(\+\+|\+|~)?[A-Za-z_][\w.]*=")  # Hydra's key=value, +key=value, ~key=value


def _is_override(arg: str) -> bool:
    """An override (`amg.points_per_side=16`) rather than a path; an existing path always wins."""
    return _OVERRIDE.match(arg) is not None and not Path(arg).exists()


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from omegaconf import OmegaConf

    from sam_train.engine.interactive import EmbeddingStore, InteractiveSegmenter
    from sam_train.engine.journal import AnnotationJournal
    from sam_train.engine.loop import current_model
    from sam_train.engine.mlbackend import Backend, ImageSource, ModelSource, make_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    engine = Path(args.checkpoint)
    if (engine / "engine.yaml").is_file():  # an engine work folder: serve its newest round's model, and follow it
        name = args.model or OmegaConf.load(engine / "engine.yaml").model.name
        workdir = Path(args.workdir or engine)
        locate = lambda: current_model(engine)  # noqa: E731
    else:
        fixed = None if args.checkpoint == "builtin" else Path(args.checkpoint)
        name, workdir, locate = args.model or "tiny", Path(args.workdir or "sam-train-serve"), lambda: fixed

    def segmenter(model: Sam) -> InteractiveSegmenter:  # each model its own embedding cache: the encoder changed
        store = EmbeddingStore(model, workdir / "embeddings", capacity=args.memory_images, disk_limit_mb=args.disk_cache_mb)
        return InteractiveSegmenter(store)

    source = ModelSource(name, locate, segmenter, _process_device(args.device, 0))
    served = source()  # load now: a bad checkpoint fails here, not at the first click
    token = args.label_studio_token or os.environ.get("LABEL_STUDIO_TOKEN")
    backend = Backend(source, ImageSource(args.label_studio_url, token, args.images_root),
                      AnnotationJournal(workdir / "annotations.jsonl"))
    server = make_server(backend, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {served.version} ({locate() or 'builtin'}) as a Label Studio ML backend at http://{host}:{port}",
          flush=True)
    print(f"embeddings: {served.segmenter.store.folder}; annotations journal: {backend.journal.path}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _cmd_engine_init(args: argparse.Namespace) -> int:
    from sam_train.engine.loop import Engine, init_workdir

    # `--images a b key=value`: argparse gives the overrides after --images to it; they are overrides all the same.
    images = [str(p) for p in args.images if not _is_override(str(p))]
    overrides = [*args.overrides, *(str(p) for p in args.images if _is_override(str(p)))]
    root = init_workdir(args.workdir, images, overrides, args.config)
    print(Engine(root).status())
    return 0


def _cmd_engine_run(args: argparse.Namespace) -> int:
    from sam_train.engine.loop import Engine, format_rounds

    engine = Engine(args.workdir)
    summaries = engine.run(rounds=args.rounds, wait=not args.no_wait)
    if summaries:
        print(format_rounds(summaries))
    print(f"rounds: {engine.root / 'rounds.json'}")
    return 0


def _cmd_engine_status(args: argparse.Namespace) -> int:
    from sam_train.engine.loop import Engine

    print(Engine(args.workdir).status())
    return 0


def _cmd_engine_ingest(args: argparse.Namespace) -> int:
    from sam_train.engine.loop import hand_back

    print(f"corrections of this round: {hand_back(args.workdir, args.file, args.format)} (`engine run` ingests them)")
    return 0


def _add_engine_commands(commands: argparse._SubParsersAction) -> None:
    engine = commands.add_parser(
        "engine", help="the data-engine loop: init, run, status, ingest (see docs/engine.md)"
    ).add_subparsers(dest="action", required=True)
    init = engine.add_parser(
        "init", help="make a work folder: image pool, start model, configs/engine.yaml resolved",
        description="e.g. `sam-train engine init work --images photos/ annotator.kind=people data.eval=[held_out_shards]`",
    )
    init.add_argument("workdir", type=Path, help="the work folder to create")
    init.add_argument("--images", nargs="+", required=True,
                      help="image files, folders of images, or shard datasets (only their images are read)")
    init.add_argument("--config", default="engine", help="a configs/ file: engine (default) or engine_demo")
    init.add_argument("overrides", nargs="*", help="Hydra overrides of the config (key=value)")
    init.set_defaults(func=_cmd_engine_init)

    run = engine.add_parser("run", help="run rounds: train, autolabel, export, annotate, ingest, version, evaluate")
    run.add_argument("workdir", type=Path, help="a work folder made by `engine init`")
    run.add_argument("--rounds", type=int, help="stop after this many rounds (default: the work folder's config)")
    run.add_argument("--no-wait", action="store_true", help="return instead of waiting for people's corrections")
    run.set_defaults(func=_cmd_engine_run)

    status = engine.add_parser("status", help="where the loop stands: next step, dataset versions, rounds")
    status.add_argument("workdir", type=Path, help="a work folder made by `engine init`")
    status.set_defaults(func=_cmd_engine_status)

    ingest = engine.add_parser("ingest", help="hand back a corrections file for the current round")
    ingest.add_argument("workdir", type=Path, help="a work folder made by `engine init`")
    ingest.add_argument("file", type=Path, help="the corrections: a COCO JSON, CVAT XML, Label Studio JSON export or SA-1B folder")
    ingest.add_argument("--format", required=True, choices=["coco", "cvat", "labelstudio", "sa1b"],
                        help="the tool the file comes from")
    ingest.set_defaults(func=_cmd_engine_ingest)


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="datasets: synthesise, convert, check, show").add_subparsers(
        dest="action", required=True
    )
    synth = data.add_parser("synth", help="write the built-in synthetic SA-1B-style dataset")
    synth.add_argument("out", type=Path, help="the dataset folder to write (shards + manifest.json)")
    synth.add_argument("--images", type=int, default=1000, help="images to draw")
    synth.add_argument("--seed", type=int, default=0, help="the same seed draws the same images")
    synth.add_argument("--samples-per-shard", type=int, default=100, help="images per tar shard")
    synth.add_argument("--workers", type=int, default=0, help="processes drawing images (0 = one per core)")
    synth.add_argument("--style", default="objects", choices=["objects", "cells"],
                       help="scene style: objects (the built-in model's domain) or cells (microscopy-like)")
    synth.set_defaults(func=_cmd_data_synth)

    convert = data.add_parser("convert", help="convert a dataset to SA-1B-style shards + manifest (resumable)")
    convert.add_argument("source", choices=["sa1b", "coco", "masks"], help="the input format")
    convert.add_argument("src", type=Path, help="sa1b: extracted folder; coco: images folder; masks: images folder")
    convert.add_argument("out", type=Path, help="the dataset folder to write (shards + manifest.json)")
    convert.add_argument("--annotations", type=Path, help="coco: instances JSON")
    convert.add_argument("--masks", type=Path, help="masks: folder of instance-label PNGs, same stems as the images")
    convert.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    convert.set_defaults(func=_cmd_data_convert)

    check = data.add_parser("check", help="validate every sample; one line per bad sample; exit 1 if any")
    check.add_argument("shards", nargs="+", type=Path, help="dataset folders, folders of tars, or tar files")
    check.set_defaults(func=_cmd_data_check)

    show = data.add_parser("show", help="draw a sample's masks over its image")
    show.add_argument("shard", type=Path, help="a tar shard")
    show.add_argument("--key", required=True, help="the sample key inside the shard")
    show.add_argument("--out", type=Path, required=True, help="the PNG to write")
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

    autolabel = commands.add_parser(
        "autolabel",
        help="automatic masks for images -> SA-1B shards (resumable; Hydra overrides of configs/autolabel.yaml)",
        usage="sam-train autolabel CKPT IMAGES... OUT [--model NAME] [--semi-automatic] [--device D]"
        " [--rank R --world-size W | --finalize] [overrides...]",
        description="CKPT: an official-layout .pth/.safetensors, or `builtin` for the package's pretrained weights."
        " IMAGES: image files or folders of them (any depth). OUT: the shard folder; rerunning the same command"
        " resumes it. Overrides, e.g. `amg.points_per_side=16 amg.crop_n_layers=1 round=2`. The built-in tiny"
        " predicts IoUs of ~0.4-0.7: pass e.g. `amg.pred_iou_thresh=0.35 amg.stability_score_thresh=0.7` with it,"
        " as configs/engine_demo.yaml does."
        " Several processes (e.g. `srun`, slurm/autolabel.sbatch) share the shards, rank r writing every W-th from"
        " the r-th, and write no manifest: run the same command once more with --finalize when all are done.",
    )
    autolabel.add_argument("inputs", nargs="+", metavar="CKPT IMAGES... OUT [overrides]",
                           help="checkpoint, images or folders, output shard folder, then key=value overrides")
    autolabel.add_argument("--model", default="tiny", help="a configs/model/ name: vit_b | vit_l | vit_h | tiny")
    autolabel.add_argument(
        "--semi-automatic", action="store_true",
        help="keep only confident masks (configs/autolabel.yaml semi_automatic) and record the uncovered area",
    )
    _add_rank_options(autolabel)
    autolabel.set_defaults(func=_cmd_autolabel)

    embed = commands.add_parser(
        "embed",
        help="image embeddings of every sample -> a cache for decoder-only training (resumable; configs/embed.yaml)",
        usage="sam-train embed CKPT SHARDS... OUT [--model NAME] [--device D] [--rank R --world-size W | --finalize]"
        " [overrides...]",
        description="CKPT: an official-layout .pth/.safetensors, or `builtin`. SHARDS: dataset folders, folders of"
        " tars or tars (train and val: training reads every sample from the cache). OUT: the cache folder, keyed to"
        " CKPT's image encoder and the preprocessing; rerunning the same command resumes it. Overrides, e.g."
        " `hflip=true dtype=float16`. Several processes share the shards as in autolabel, then --finalize.",
    )
    embed.add_argument("inputs", nargs="+", metavar="CKPT SHARDS... OUT [overrides]",
                       help="checkpoint, shard datasets, output cache folder, then key=value overrides")
    embed.add_argument("--model", default="tiny", help="a configs/model/ name: vit_b | vit_l | vit_h | tiny")
    _add_rank_options(embed)
    embed.set_defaults(func=_cmd_embed)

    serve = commands.add_parser(
        "serve",
        help="our model as a Label Studio ML backend: clicks in the labelling UI answered with masks",
        description="CKPT: an official-layout .pth/.safetensors, `builtin`, or an engine work folder (then the"
        " newest round's model is served, the next one as soon as the engine has trained it, and WORKDIR defaults"
        " to that folder). Connect it in Label Studio (project"
        " settings > Model, or POST /api/ml with is_interactive=true) and label with smart keypoints and rectangles;"
        " each image's embedding is computed once and cached in memory and under WORKDIR/embeddings. Label"
        " Studio's webhook appends every submitted annotation to WORKDIR/annotations.jsonl: give the engine's"
        " work folder as WORKDIR and its assisted rounds ingest them. Label Studio must be started with"
        " ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false to call a backend on a private or loopback address.",
    )
    serve.add_argument("checkpoint", metavar="CKPT", help="a checkpoint file, `builtin`, or an engine work folder")
    serve.add_argument("--model", help="a configs/model/ name: vit_b | vit_l | vit_h | tiny (default: the engine's, else tiny)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=int, default=9090, help="port to listen on")
    serve.add_argument("--workdir", help="embedding cache and annotations journal: an engine work folder, to ingest what"
                       " people submit (default: the engine folder given as CKPT, else ./sam-train-serve)")
    serve.add_argument("--memory-images", type=int, default=16, help="image embeddings kept in memory (LRU)")
    serve.add_argument("--disk-cache-mb", type=float, default=None,
                       help="bound the on-disk embedding cache: least recently used ones are deleted (default unbounded)")
    serve.add_argument("--label-studio-url", help="where task images are fetched (default: what Label Studio tells /setup)")
    serve.add_argument("--label-studio-token", help="API token for fetching images (default $LABEL_STUDIO_TOKEN, or /setup's)")
    serve.add_argument("--images-root", action="append", default=[],
                       help="a folder whose files tasks may name by local path (repeatable; none by default)")
    serve.add_argument("--device", default="auto", help="auto (a GPU if there is one) | cpu | cuda:N")
    serve.set_defaults(func=_cmd_serve)

    models = commands.add_parser("models", help="list the named model configurations")
    models.set_defaults(func=_cmd_models)

    _add_data_commands(commands)
    _add_engine_commands(commands)

    checkpoint = commands.add_parser("checkpoint", help="checkpoint conversion").add_subparsers(dest="action", required=True)
    export = checkpoint.add_parser(
        "export", help="load weights strictly and write them in Meta's official layout (.pth, or .safetensors by suffix)"
    )
    export.add_argument("src", type=Path, help="official-layout .pth or .safetensors")
    export.add_argument("dst", type=Path, help="the file to write: .pth, or .safetensors by suffix")
    export.add_argument("--model", required=True, help="vit_b | vit_l | vit_h | tiny")
    export.set_defaults(func=_cmd_checkpoint_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sam-train` console script."""
    parser = build_parser()
    args, trailing = parser.parse_known_args(argv)
    # argparse gives positionals that follow an option (`OUT --semi-automatic amg.x=1`) no home;
    # commands that take a free list of inputs collect them.
    if trailing and (not hasattr(args, "inputs") or any(t.startswith("-") for t in trailing)):
        parser.error(f"unrecognized arguments: {' '.join(trailing)}")
    if trailing:
        args.inputs += trailing
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
