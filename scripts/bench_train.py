"""Cost of one SAM training step: where the time goes, batched decoder rounds vs a per-mask loop, images/s and MFU.

Measurements on one batch, in one process (`--parts` picks them):
  phases  one full training step (SamModule.training_step, backward, gradient clipping, optimiser)
          under torch.profiler, split by the module's named scopes: encoder (normalise + image
          encoder), prompts (simulated first prompts and corrective clicks), decoder (prompt
          encoder + mask decoder, all rounds), loss (all rounds), backward, optimiser. CPU time
          on a CPU; GPU kernel time on a GPU (idle gaps between kernels are in no phase)
  rounds  the interactive session (11 rounds, forward + backward down to the image embeddings)
          over all masks at once, as training runs it, against the same function called one
          mask at a time (same masks, same loss normaliser: the same total work)
  speed   images/s of full steps, and model-FLOPs utilisation: FLOPs of one step (forward +
          backward, torch.utils.flop_counter) / step time / the device's peak dense FLOP/s
  precision  full steps in fp32 and in bf16 autocast, each with PyTorch's fused attention kernel
          and as training runs it (on a CPU the decoder's attention is matmul-softmax-matmul with
          the softmax along the longer side: `sam_train.model.transformer.attention`), plus bf16
          with the softmax always along the keys (the textbook layout), timed round-robin in one process
  cached  decoder-only training (image encoder frozen): full steps with the encoder running
          against steps reading the batch's embeddings as an embedding cache gives them
          (`sam-train embed`: stored in bf16, read back to float32), timed round-robin in one
          process, then where a cached step's time goes (the phases above, for that step);
          run last, it freezes the encoder

The batch is real by default: synthetic shards written to a temporary folder and decoded by the
training pipeline (needs webdataset). `--synthetic-batch` draws random pixels and elliptical
masks directly in torch instead: the step's cost depends on the shapes, not the content.
Hyper-parameters come from configs/, composed with Hydra as `sam-train fit model=<model>` does, and
trailing Hydra overrides change them as they would there: `prompts.corrective_rounds=0
prompts.empty_rounds=0` is a session of one round (the first point or box only). Precision bf16 is
Lightning's `bf16-mixed`: autocast around the forward pass. On a CPU, the machine's 1-minute load
average is printed before and after: above the thread count, other processes shared the cores.

Memory on a GPU grows with the masks: every round keeps its decoder activations for the backward
pass, and vit_b in bf16 runs out of an H100's 80 GB at 4 images x 64 masks
(prompts.checkpoint_rounds=true keeps one round's activations at a time). The per-mask loop
is launch-bound on a GPU (11 rounds x N masks of small kernels): leave `rounds` out there.

    python scripts/bench_train.py --repeats 5
    python scripts/bench_train.py --images 8 --masks 8 --parts precision experiment=quickstart
    python scripts/bench_train.py --device cuda --precision bf16 --model vit_b --images 4 --masks 16 --synthetic-batch \
        --parts phases,speed --warmup 2
    python scripts/bench_train.py --model vit_b --images 1 --masks 8 --parts cached --repeats 3
    python scripts/bench_train.py --model vit_b --images 1 --masks 8 --parts cached --repeats 3 \
        prompts.corrective_rounds=0 prompts.empty_rounds=0
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from omegaconf import OmegaConf
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from sam_train.config import load_config
from sam_train.data.embeddings import PLAIN, pack_embeddings, unpack_embedding
from sam_train.losses import LossWeights
from sam_train.model import FinetuneConfig, build_sam, prepare_finetune, transformer
from sam_train.module import SamModule
from sam_train.prompts import PromptConfig

PHASES = {  # profiler scope -> row label
    "encoder": "image encoder (+ normalise)",
    "prompts": "prompt simulation",
    "decoder": "decoder rounds",
    "loss": "loss",
    "backward": "backward",
    "optimizer": "optimiser (clip + step)",
}
# Peak dense bf16 tensor-core FLOP/s by device name (first match wins; SXM parts unless named).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]
# The CPU flash-attention kernels have no formula in torch's flop counter: count them as the GPU ones.
aten = torch.ops.aten
CPU_ATTENTION_FLOPS = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def load_hparams(model: str, overrides: list[str] = ()) -> dict:
    """The prompts, optim, loss and data `sample` groups that `sam-train fit model=<model> <overrides>` trains with."""
    cfg = OmegaConf.to_container(load_config("fit", [f"model={model}", *overrides]), resolve=True)
    return {"prompts": cfg["prompts"], "optim": cfg["optim"], "loss": cfg["loss"], "sample": cfg["data"]["sample"],
            "total_steps": cfg["total_steps"], "finetune": cfg["model"]["finetune"]}


def shard_batch(images: int, masks_per_image: int, image_size: int, sample: dict, seed: int) -> dict:
    """A training batch the real way: synthetic shards -> decode_sample -> collate -> expand_batch."""
    from sam_train.data.pipeline import SampleConfig, collate, decode_sample, expand_batch, sample_rng
    from sam_train.data.shards import iter_raw_samples, resolve_shards
    from sam_train.data.synth import synth_dataset

    cfg = SampleConfig(image_size=image_size, **{**sample, "max_masks": masks_per_image})
    with tempfile.TemporaryDirectory() as tmp:
        synth_dataset(tmp, images, seed, workers=1)
        raws = [raw for ref in resolve_shards([tmp]) for raw in iter_raw_samples(ref.url)]
        samples = [decode_sample(raw, cfg, sample_rng(seed, 0, raw.key)) for raw in raws]
    return expand_batch(collate([s for s in samples if s is not None]), image_size)


def random_batch(images: int, masks_per_image: int, image_size: int, mask_stride: int, seed: int) -> dict:
    """Random pixels and random ellipses as masks, made directly in torch (no data pipeline, no webdataset)."""
    generator = torch.Generator().manual_seed(seed)
    n, m = images * masks_per_image, image_size // mask_stride
    centre = torch.rand(n, 2, 1, 1, generator=generator) * m
    radius = (0.03 + 0.3 * torch.rand(n, 2, 1, 1, generator=generator)) * m
    grid = torch.arange(m, dtype=torch.float32)
    masks = ((grid[:, None] - centre[:, 0]) / radius[:, 0]) ** 2 + ((grid - centre[:, 1]) / radius[:, 1]) ** 2 <= 1
    return {
        "images": torch.randint(0, 256, (images, 3, image_size, image_size), dtype=torch.uint8, generator=generator),
        "content_sizes": torch.full((images, 2), image_size, dtype=torch.long),
        "masks": masks,  # N x m x m bool
        "image_index": torch.arange(images).repeat_interleave(masks_per_image),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_times(fns: dict[str, Callable[[], None]], device: torch.device, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round-robin so drifting machine load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def print_phases(title: str, phases: dict[str, float], device: torch.device) -> float:
    """Print a phase -> seconds split as a table (ms and share of the sum); returns the sum."""
    total = sum(phases.values())
    what = "GPU kernel time" if device.type == "cuda" else "CPU time"
    print(f"\nphases of {title} ({what} under the profiler)")
    print(f"{'':30}{'ms':>10}{'share':>8}")
    for name, label in [*PHASES.items(), ("other", "other")]:
        print(f"{label:30}{1000 * phases[name]:10.1f}{100 * phases[name] / total:7.1f}%")
    return total


def profiled_phases(step: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Seconds per phase of one step: CPU time of each named scope, or on a GPU the kernel time launched inside it.

    On a GPU, backward kernels are launched by autograd's device thread, outside every scope of
    this thread: they count as backward. "other" is the step's time in no named phase.
    """
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function("step"):
            step()
        sync(device)
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]  # GPU-side copies of the scopes left out
    seconds = lambda e: (e.device_time_total if cuda else e.cpu_time_total) / 1e6  # noqa: E731
    main = next(e for e in events if e.name == "step")
    phases = {name: sum(seconds(e) for e in events if e.name == name) for name in PHASES}
    total = seconds(main)
    if cuda:
        autograd = sum(seconds(e) for e in events if e.thread != main.thread and e.cpu_parent is None)
        phases["backward"] += autograd
        total += autograd
    phases["other"] = total - sum(phases.values())
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--masks", type=int, default=16, help="masks per image (the data config's max_masks)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--parts", default="phases,rounds,speed,precision,cached",
                        help="comma-separated subset of phases,rounds,speed,precision,cached")
    parser.add_argument("--synthetic-batch", action="store_true", help="random tensors instead of decoded synthetic shards")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak dense TFLOP/s for MFU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 is steadier where other processes share the cores")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the fit config, e.g. prompts.corrective_rounds=0")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; there is no Trainer here
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    hp = load_hparams(args.model, args.overrides)
    model = build_sam(args.model)
    module = SamModule(model, PromptConfig(**hp["prompts"]), LossWeights(**hp["loss"]), hp["optim"], hp["total_steps"])
    module.to(device).train()
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    if args.synthetic_batch:
        batch, source = random_batch(args.images, args.masks, model.image_size, hp["sample"]["mask_stride"], args.seed), "random tensors"
    else:
        batch = shard_batch(args.images, args.masks, model.image_size, hp["sample"], args.seed)
        source = "synthetic shards -> decode_sample -> expand_batch"
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    images, n = len(batch["images"]), len(batch["masks"])
    bf16_default = args.precision == "bf16"

    def autocast(bf16: bool = bf16_default) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def train_step(step_batch: dict = batch, bf16: bool = bf16_default) -> None:
        """What Lightning runs per step: the module's step under autocast, backward, norm clipping, optimiser, lr schedule."""
        with autocast(bf16):
            loss = module.training_step(step_batch, 0)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(module.parameters(), hp["optim"]["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}"
    else:
        machine = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    rounds = PromptConfig(**hp["prompts"]).rounds
    print(f"{args.model} on {machine}; torch {torch.__version__}; {args.precision}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    print(f"batch: {images} images at {model.image_size} px, {n} masks at {batch['masks'].shape[-1]} px ({source}); "
          f"{rounds} rounds per mask; median of {args.repeats} after {args.warmup} warm-up")
    if args.overrides:
        print(f"overrides: {' '.join(args.overrides)}")
    if device.type == "cpu":
        print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f}")

    if "phases" in parts:
        for _ in range(args.warmup):
            train_step()
        runs = [profiled_phases(train_step, device) for _ in range(args.repeats)]
        step_wall = statistics.median(wall_times({"step": train_step}, device, args.repeats, 0)["step"])
        phases = {name: statistics.median(run[name] for run in runs) for name in [*PHASES, "other"]}
        total = print_phases("one training step", phases, device)
        print(f"{'sum':30}{1000 * total:10.1f}")
        print(f"{'step wall time, no profiler':30}{1000 * step_wall:10.1f}")

    if "rounds" in parts:
        with torch.no_grad(), autocast():
            embeddings = module.model.encode_image(module.normalize(batch["images"], batch["content_sizes"]))
        masks, image_index = batch["masks"], batch["image_index"]

        def session(per_mask: bool) -> None:
            """Forward + backward of all rounds, down to the (leaf) image embeddings; the encoder is not run."""
            leaf = embeddings.detach().requires_grad_()
            with autocast():
                if per_mask:
                    loss = sum(module.interactive_session(leaf, masks[i:i + 1], image_index[i:i + 1], float(n))["total"]
                               for i in range(n))
                else:
                    loss = module.interactive_session(leaf, masks, image_index, float(n))["total"]
            loss.backward()
            module.zero_grad(set_to_none=True)

        times = wall_times({"batched": lambda: session(False), "per_mask": lambda: session(True)}, device,
                           args.repeats, args.warmup)
        batched, looped = (statistics.median(times[k]) for k in ("batched", "per_mask"))
        print(f"\ndecoder rounds, forward + backward ({rounds} rounds x {n} masks, wall time)")
        print(f"{'':30}{'ms':>10}{'ms/mask':>10}")
        print(f"{'batched over all masks':30}{1000 * batched:10.1f}{1000 * batched / n:10.2f}")
        print(f"{'per-mask loop':30}{1000 * looped:10.1f}{1000 * looped / n:10.2f}")
        print(f"{'per-mask / batched':30}{looped / batched:9.2f}x")

    if "speed" in parts:
        mapping = CPU_ATTENTION_FLOPS if device.type == "cpu" else {}
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            with autocast():
                loss = module.training_step(batch, 0)
            loss.backward()
        module.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        step = statistics.median(wall_times({"step": train_step}, device, args.repeats, args.warmup)["step"])
        peak = 1e12 * args.peak_tflops if args.peak_tflops else None
        if peak is None and device.type == "cuda" and args.precision == "bf16":
            peak = next((p for name, p in PEAK_BF16 if name in torch.cuda.get_device_name(device)), None)
        print("\nfull training steps (wall time)")
        print(f"{'step':30}{1000 * step:10.1f} ms")
        print(f"{'images/s':30}{images / step:10.2f}")
        print(f"{'model FLOPs / step (fwd+bwd)':30}{flops / 1e9:10.1f} GFLOP")
        print(f"{'achieved':30}{flops / step / 1e12:10.3f} TFLOP/s")
        if device.type == "cuda":
            print(f"{'peak memory':30}{torch.cuda.max_memory_allocated(device) / 2**30:10.1f} GiB")
        if peak:
            print(f"{'MFU':30}{100 * flops / step / peak:9.1f}%  (of {peak / 1e12:.0f} TFLOP/s peak dense {args.precision})")
        else:
            print(f"{'MFU':30}{'n/a':>10}  (no known peak for this device: pass --peak-tflops)")

    if "precision" in parts:
        ours = transformer.attention

        def with_attention(kernel: Callable, bf16: bool) -> Callable[[], None]:
            def step() -> None:
                transformer.attention = kernel
                try:
                    train_step(bf16=bf16)
                finally:
                    transformer.attention = ours
            return step

        def softmax_along_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """The textbook layout: scores laid out queries x keys, whatever their lengths."""
            return (q * q.shape[-1] ** -0.5 @ k.transpose(-1, -2)).softmax(-1) @ v

        fused = torch.nn.functional.scaled_dot_product_attention
        variants = {  # name: (label, step)
            "fp32_fused": ("fp32, fused attention", with_attention(fused, False)),
            "fp32": ("fp32 (as trained without bf16)", lambda: train_step(bf16=False)),
            "bf16_fused": ("bf16 autocast, fused attention", with_attention(fused, True)),
            "bf16_keys": ("bf16, softmax along keys", with_attention(softmax_along_keys, True)),
            "bf16": ("bf16 autocast (as trained)", lambda: train_step(bf16=True)),
        }
        times = wall_times({name: step for name, (_, step) in variants.items()}, device, args.repeats, args.warmup)
        baseline = statistics.median(times["fp32_fused"])
        print(f"\nfull training steps by precision and attention kernel (wall time, {rounds} rounds x {n} masks)")
        print(f"{'':34}{'ms':>10}{'vs fp32 fused':>15}")
        for name, (label, _) in variants.items():
            step = statistics.median(times[name])
            print(f"{label:34}{1000 * step:10.1f}{baseline / step:14.2f}x")

    if "cached" in parts:
        prepare_finetune(module.model, FinetuneConfig(**{**hp["finetune"], "freeze_image_encoder": True}))
        optimizers = module.configure_optimizers()  # train_step steps these from now on: the decoder's parameters
        optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
        with torch.no_grad(), autocast():
            embeddings = module.model.encode_image(module.normalize(batch["images"], batch["content_sizes"]))
        stored = [unpack_embedding(pack_embeddings({PLAIN: e}, "bfloat16"), flip=False) for e in embeddings]
        cached_batch = {**batch, "embeddings": torch.stack(stored).to(device)}
        times = wall_times({"encoder": lambda: train_step(batch), "cache": lambda: train_step(cached_batch)}, device,
                           args.repeats, args.warmup)
        with_encoder, with_cache = (statistics.median(times[k]) for k in ("encoder", "cache"))
        print(f"\ndecoder-only training, image encoder frozen: full steps (wall time; {rounds} rounds x {n} masks)")
        print(f"{'':30}{'ms':>10}{'images/s':>10}")
        print(f"{'encoder runs (forward only)':30}{1000 * with_encoder:10.1f}{images / with_encoder:10.2f}")
        print(f"{'embeddings from the cache':30}{1000 * with_cache:10.1f}{images / with_cache:10.2f}")
        print(f"{'speed-up per step':30}{with_encoder / with_cache:9.1f}x")
        print(f"{'cached step per mask-round':30}{1000 * with_cache / (rounds * n):10.1f}")
        print_phases("one step from the cache", profiled_phases(lambda: train_step(cached_batch), device), device)

    if device.type == "cpu":
        print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f} ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
