"""The DataModule inside a real Lightning Trainer: hooks expand batches, the position is checkpointed and resumed."""

from __future__ import annotations

import lightning as L
import torch

from sam_train.data.datamodule import SA1BDataModule


class KeyRecorder(L.LightningModule):
    """Records what each training step receives; its one weight lets the optimiser step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen: list[list[str]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert batch["images"].shape[1:] == (3, 64, 64) and batch["images"].dtype == torch.uint8
        assert batch["masks"].shape[1:] == (16, 16) and len(batch["image_index"]) == len(batch["masks"])
        assert "mask_runs" not in batch and "skipped" not in batch
        self.seen.append(list(batch["keys"]))
        return self.weight * (batch["images"].float().mean() + batch["masks"].float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def datamodule(dataset) -> SA1BDataModule:
    return SA1BDataModule([str(dataset)], image_size=64, sample={"mask_stride": 4}, batch_size=2, num_workers=2, pin_memory=False)


def trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, **kw,
    )


def test_resume_from_a_mid_epoch_checkpoint_continues_with_no_repeat_and_no_gap(synth_24, tmp_path):
    full = KeyRecorder()
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    trainer(tmp_path / "full", max_epochs=1, callbacks=[saver]).fit(full, datamodule=datamodule(synth_24))
    assert len(full.seen) == 12  # 24 samples, batches of 2
    (mid,) = [p for p in (tmp_path / "ckpt").iterdir() if "step=5" in p.name]
    assert torch.load(mid, weights_only=True)["SA1BDataModule"]["batches"] == 5

    rest = KeyRecorder()
    trainer(tmp_path / "b", max_epochs=1, enable_checkpointing=False).fit(rest, datamodule=datamodule(synth_24), ckpt_path=mid)
    assert rest.seen == full.seen[5:]


def held_out_masks(dm: SA1BDataModule) -> dict[str, list[bytes]]:
    """Each validation image's masks, as the bytes of their run lengths."""
    masks: dict[str, list[bytes]] = {}
    for batch in dm.val_dataloader():
        offsets = batch["mask_offsets"].tolist()
        for m, image in enumerate(batch["mask_image"].tolist()):
            runs = batch["mask_runs"][offsets[m] : offsets[m + 1]]
            masks.setdefault(batch["keys"][image], []).append(runs.numpy().tobytes())
    return masks


def test_validation_keeps_its_own_masks_when_training_samples_fewer_per_image(synth_24):
    def dm(train_masks: int, val_masks: int | None) -> SA1BDataModule:
        return SA1BDataModule(
            [str(synth_24)], image_size=64, val=[str(synth_24)], sample={"mask_stride": 4, "max_masks": train_masks},
            batch_size=4, num_workers=0, pin_memory=False, val_max_masks=val_masks,
        )

    fixed = held_out_masks(dm(train_masks=1, val_masks=3))
    assert fixed == held_out_masks(dm(train_masks=3, val_masks=None))  # the very masks a 3-mask recipe holds out
    assert max(len(m) for m in fixed.values()) == 3 and len(fixed) == 24
    assert max(len(m) for m in held_out_masks(dm(train_masks=1, val_masks=None)).values()) == 1
    train_batch = next(iter(dm(train_masks=1, val_masks=3).train_dataloader()))
    assert len(train_batch["mask_image"]) == len(train_batch["keys"])  # training still samples 1 a image
