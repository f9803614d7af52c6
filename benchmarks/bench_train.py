"""``make bench`` (training part): patches/s of each recipe's ``ldct train`` step on this machine.

Each recipe runs the real training loop (DataLoader workers, augmentation, the recipe's
losses and optimizers) at its paper's patch size on a generated 512x512 dataset, with
the batch size given below; the rate is the median of the per-step rates after a warm-up
(validation and checkpoint writing excluded), and "waiting for data" is the share of
the steady-state time the loop spent waiting for its next batch.

Run from the repository root: ``python -m benchmarks.bench_train --out bench-out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

# (label, model or preset, batch size, extra config): paper patch sizes; WGAN-VGG's paper
# batch of 128 is also measured, its step is long on a CPU.
CASES = [
    ("redcnn (MSE)", "redcnn", 16, {}),
    ("wgan_vgg (WGAN-GP + CT perceptual)", "wgan_vgg", 16, {}),
    ("wgan_vgg, paper batch", "wgan_vgg", 128, {}),
    ("wgan_vgg generator, CNN-MSE", "cnn_mse", 16, {}),
    ("pix2pix_small (cGAN + 100 L1)", "pix2pix_small", 1, {}),
    ("ct_features (autoencoder)", "ct_features", 16, {}),
]


def measure(dataset: Path, run: Path, label: str, name: str, batch: int, extra: dict, *,
            steps: int, workers: int, device: str, ct_weights: str) -> dict:
    from ldct_cli.models.registry import list_models
    from ldct_cli.training.config import resolve_config
    from ldct_cli.training.loop import train

    model, preset = (name, None) if name in list_models(None) else (None, name)
    overrides = {"data.path": str(dataset), "data.batch_size": batch, "data.workers": workers,
                 "schedule.max_steps": steps, "schedule.log_every": 1, "schedule.val_every": 10 ** 9,
                 "schedule.checkpoint_every": 10 ** 9, "schedule.val_slices": 1, "device": device,
                 "ct_weights": ct_weights, **extra}
    config = resolve_config(model=model, config_file=preset, overrides=overrides)
    result = train(config, run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["patches_per_s"] for r in records if r["kind"] == "train"][2:-1]  # warm-up; last has the save
    return {"label": label, "model": config.model, "recipe": config.recipe, "batch": batch,
            "patch": config.data.patch_size, "steps": steps,
            "patches_per_s": statistics.median(rates),
            "seconds_per_step": batch * (config.loss.n_critic + 1 if config.recipe == "wgan_gp" else 1)
            / statistics.median(rates),
            "data_wait_fraction": result.data_wait_fraction}


def main() -> None:
    import torch

    from benchmarks.bench_denoise import machine
    from ldct_cli.checkpoint import save_checkpoint
    from ldct_cli.models.registry import create_model
    from tests.training_data import make_training_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="steps per recipe (the first two are warm-up)")
    parser.add_argument("--cases", default="", help="comma-separated labels' first words to run (default all)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = set(filter(None, args.cases.split(",")))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dataset = make_training_dataset(tmp / "data", n_cases=1, n_slices=12, size=512, split="0.5,0.25,0.25")
        torch.manual_seed(0)
        ct_weights = tmp / "ct_features.safetensors"  # random weights cost the same time as trained ones
        save_checkpoint(create_model("ct_features"), ct_weights)
        rows = []
        for index, (label, name, batch, extra) in enumerate(CASES):
            if wanted and label.split()[0] not in wanted and name not in wanted:
                continue
            steps = args.steps if batch <= 16 else 4
            rows.append(measure(dataset, tmp / "runs" / str(index), label, name, batch, extra, steps=steps,
                                workers=args.workers, device=args.device, ct_weights=str(ct_weights)))
            print(json.dumps(rows[-1]), flush=True)
    results = {"machine": machine(), "device": args.device, "workers": args.workers, "rows": rows}
    (args.out / "bench_train.json").write_text(json.dumps(results, indent=2))
    lines = [f"Machine: {results['machine']}; device {args.device}, {args.workers} DataLoader workers.", "",
             "| recipe | patch | batch | patches/s | s/step | waiting for data |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['patch']}² | {r['batch']} | {r['patches_per_s']:.1f} | "
                     f"{r['seconds_per_step']:.2f} | {100 * r['data_wait_fraction']:.1f}% |")
    (args.out / "bench_train.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
