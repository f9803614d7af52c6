"""``make bench``: throughput and memory of ``ldct denoise`` on a generated 512x512 series.

For each registered model on the current device: slices/s of the model's forward pass
alone (HU stacks already in memory: the compute floor), slices/s of ``ldct denoise``
end to end, their ratio, and peak memory. Then the I/O path alone (``--blend 1``, the
model never runs) against a plain single-threaded pydicom read -> write loop over the
same files, and peak memory for a short and a long series.

Each measured run is a separate process (``--child``), so peak RSS is its own.
Run from the repository root: ``python -m benchmarks.bench_denoise --out bench-out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _series(folder: Path, n: int, syntax: str) -> Path:
    """A 512x512 synthetic CT series of ``n`` slices (made once, reused)."""
    from tests.synth import SeriesSpec, write_series

    if not folder.is_dir():
        write_series(folder, SeriesSpec(rows=512, columns=512, n_slices=n, transfer_syntax=syntax,
                                        slice_positions_mm=tuple(0.7 * i for i in range(n))))
    return folder


def _checkpoint(folder: Path, name: str) -> Path:
    import torch

    from ldct_cli import create_model, save_checkpoint

    path = folder / f"{name}.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        save_checkpoint(create_model(name), path)
    return path


def _peak_mb() -> tuple[float, float]:
    """Peak RSS of this process and of its largest finished child (worker), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def child_forward(weights: Path, series: Path, device: str, batch_size: int) -> dict:
    """Forward pass alone over HU stacks already in memory."""
    import numpy as np
    import torch

    from ldct_cli.checkpoint import load_checkpoint
    from ldct_cli.dicom.read import discover, load_slice, rescale_of, stored_to_hu
    from ldct_cli.inference import Denoiser, resolve_device

    [found] = discover(series).series
    images = []
    for s in found.slices:
        header, stored = load_slice(s.path)
        images.append(stored_to_hu(stored, *rescale_of(header)))
    volume = np.stack(images)[:, None]
    model, info = load_checkpoint(weights)
    dev = resolve_device(device)
    denoiser = Denoiser(model, info.hu_norm, dev, batch_size=batch_size)
    denoiser(volume[:batch_size])  # warm-up: allocator, cuDNN/oneDNN kernel choice
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(0, len(volume), batch_size):
        denoiser(volume[i:i + batch_size])
    seconds = time.perf_counter() - start
    out = {"slices": len(volume), "seconds": seconds, "slices_per_s": len(volume) / seconds}
    if dev.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def child_denoise(weights: Path, series: Path, out: Path, device: str, batch_size: int,
                  blend: float, workers: int) -> dict:
    """``ldct denoise`` itself, in-process, timed from the series' own clock."""
    from typer.testing import CliRunner

    from ldct_cli.cli import app

    args = ["denoise", str(series), str(out), "--weights", str(weights), "--device", device,
            "--batch-size", str(batch_size), "--blend", str(blend), "--workers", str(workers),
            "--json", "--quiet"]
    start = time.perf_counter()
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    wall = time.perf_counter() - start
    if result.exit_code != 0:
        raise SystemExit(f"ldct denoise failed: {result.output}")
    [entry] = json.loads(result.stdout)["series"]
    out = {"slices": entry["slices"], "seconds": entry["seconds"], "wall_seconds": wall,
           "slices_per_s": entry["slices"] / entry["seconds"]}
    try:
        import torch

        if torch.cuda.is_available():
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return out


def child_plain(series: Path, out: Path, *, one_core: bool = False) -> dict:
    """The baseline: a plain single-threaded pydicom loop, read -> decode -> write.

    The JPEG 2000 decoder (OpenJPEG) runs threads of its own, so that "single-threaded"
    loop uses both cores; ``one_core`` pins it to one, as a single thread would be.
    """
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    if one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted(series.glob("*.dcm"))
    start = time.perf_counter()
    for path in paths:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        ds.PixelData = pixels.tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(out / path.name, enforce_file_format=True)
    seconds = time.perf_counter() - start
    return {"slices": len(paths), "seconds": seconds, "slices_per_s": len(paths) / seconds}


def child_tools(work: Path, device: str) -> dict:
    """Phantom generation, dose simulation (512², 720 views) and dataset patch reads."""
    import numpy as np

    from ldct_cli.inference import resolve_device
    from ldct_cli.phantom import PhantomSpec, phantom_volume
    from ldct_cli.physics.lowdose import LowDoseSimulator

    start = time.perf_counter()
    volume = phantom_volume(PhantomSpec(size=512, n_slices=32))
    phantom_s = time.perf_counter() - start
    simulator = LowDoseSimulator(dose=0.25, pixel_mm=0.7, batch_size=4, device=resolve_device(device))
    simulator(volume[:1, None])  # warm-up
    stack = volume[:8, None]
    start = time.perf_counter()
    simulator(stack)
    sim_s = time.perf_counter() - start
    # The trainer's access pattern: random 64x64 crops from a memory-mapped int16 dataset.
    path = work / "patches.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(64, 512, 512))
    array[:] = np.clip(np.rint(np.concatenate([volume, volume])), -1024, 3071)
    array.flush()
    data = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(0)
    n = 50_000
    starts = rng.integers(0, 512 - 64, size=(n, 2))
    slices = rng.integers(0, 64, size=n)
    start = time.perf_counter()
    for k in range(n):
        r, c = starts[k]
        np.array(data[slices[k], r:r + 64, c:c + 64])
    read_s = time.perf_counter() - start
    return {"phantom_32x512_s": phantom_s, "simulate_slices_per_s": len(stack) / sim_s,
            "simulate_s_per_slice": sim_s / len(stack), "patch_reads_per_s": n / read_s}


def child_evaluate(series: Path, device: str) -> dict:
    """``ldct evaluate`` scoring a series against a reference (here: itself), slices/s."""
    from ldct_cli import evaluate as ev
    from ldct_cli.inference import resolve_device
    from ldct_cli.metrics import get_window

    start = time.perf_counter()
    tests, references = ev.load_input(series), ev.load_input(series)
    ev.evaluate(tests, reference=references,
                settings=ev.Settings(window=get_window("redcnn"), device=str(resolve_device(device))))
    seconds = time.perf_counter() - start
    n = tests[0].n_slices
    return {"slices": n, "seconds": seconds, "slices_per_s": n / seconds}


def _run_child(*args: str) -> dict:
    """Run one measurement in a fresh process; return its JSON plus its peak memory."""
    command = [sys.executable, "-m", "benchmarks.bench_denoise", "--child", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark step failed: {' '.join(args)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child_main(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "forward":
        weights, series, device, batch = rest
        result = child_forward(Path(weights), Path(series), device, int(batch))
    elif kind == "denoise":
        weights, series, out, device, batch, blend, workers = rest
        result = child_denoise(Path(weights), Path(series), Path(out), device, int(batch),
                               float(blend), int(workers))
    elif kind == "evaluate":
        series, device = rest
        result = child_evaluate(Path(series), device)
    elif kind == "tools":
        work, device = rest
        result = child_tools(Path(work), device)
    elif kind in ("plain", "plain-one-core"):
        series, out = rest
        result = child_plain(Path(series), Path(out), one_core=kind == "plain-one-core")
    else:
        raise SystemExit(f"unknown child kind {kind}")
    own, workers_mb = _peak_mb()
    result.update(peak_rss_mb=own, peak_worker_rss_mb=workers_mb)
    print(json.dumps(result))


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="results folder")
    parser.add_argument("--slices", type=int, default=64, help="slices of the main series")
    parser.add_argument("--long-slices", type=int, default=512, help="slices of the long series (memory)")
    parser.add_argument("--slow-model-slices", type=int, default=8,
                        help="slices for models slower than 1 s/slice on this device (RED-CNN on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--models", default="", help="comma-separated subset (default: all registered)")
    parser.add_argument("--only", default="models,io,memory,tools", help="which parts to run")
    args = parser.parse_args()

    from ldct_cli import list_models

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ldct-bench-"))
    models = args.models.split(",") if args.models else list_models()
    explicit = _series(work / f"explicit_{args.slices}", args.slices, "1.2.840.10008.1.2.1")
    io_inputs = {"explicit": explicit,
                 "rle": _series(work / f"rle_{args.slices}", args.slices, "1.2.840.10008.1.2.5"),
                 "jpeg2000": _series(work / f"j2k_{args.slices}", args.slices, "1.2.840.10008.1.2.4.90")}
    results: dict = {"machine": machine(), "device": args.device, "batch_size": args.batch_size,
                     "workers": args.workers, "models": {}, "io": {}, "memory": {}}
    dev, bs, workers = args.device, str(args.batch_size), str(args.workers)

    parts = set(args.only.split(","))
    for name in models if "models" in parts else []:
        weights = _checkpoint(work, name)
        # A one-slice probe decides the series length: slow models get a shorter one.
        probe = _run_child("forward", str(weights), str(_series(work / "explicit_1", 1, "1.2.840.10008.1.2.1")),
                           dev, "1")
        series = explicit
        if probe["seconds"] > 1.0 and args.slow_model_slices < args.slices:
            series = _series(work / f"explicit_{args.slow_model_slices}", args.slow_model_slices,
                             "1.2.840.10008.1.2.1")
        forward = _run_child("forward", str(weights), str(series), dev, bs)
        e2e = _run_child("denoise", str(weights), str(series), str(work / f"out_{name}"), dev, bs,
                         "0", workers)
        results["models"][name] = {"forward": forward, "end_to_end": e2e,
                                   "ratio": e2e["slices_per_s"] / forward["slices_per_s"]}
        print(f"{name}: forward {forward['slices_per_s']:.2f} slices/s, end-to-end "
              f"{e2e['slices_per_s']:.2f} slices/s ({results['models'][name]['ratio']:.0%})", flush=True)

    io_weights = _checkpoint(work, models[0])
    for label, series in io_inputs.items() if "io" in parts else []:
        # Best of three for both: short runs, and the machine may be busy now and then.
        plain = max((_run_child("plain", str(series), str(work / f"plain_{label}_{k}")) for k in range(3)),
                    key=lambda r: r["slices_per_s"])
        plain_one = max((_run_child("plain-one-core", str(series), str(work / f"plain1_{label}_{k}"))
                         for k in range(3)), key=lambda r: r["slices_per_s"])
        io = max((_run_child("denoise", str(io_weights), str(series), str(work / f"io_{label}_{k}"), dev,
                             bs, "1", workers) for k in range(3)), key=lambda r: r["slices_per_s"])
        # The same with one worker: how the I/O path scales with worker processes.
        io_one = max((_run_child("denoise", str(io_weights), str(series), str(work / f"io1_{label}_{k}"),
                                 dev, bs, "1", "1") for k in range(3)), key=lambda r: r["slices_per_s"])
        results["io"][label] = {"plain": plain, "plain_one_core": plain_one, "ldct": io,
                                "ldct_one_worker": io_one,
                                "speedup": io["slices_per_s"] / plain["slices_per_s"],
                                "speedup_one_core": io["slices_per_s"] / plain_one["slices_per_s"]}
        print(f"I/O path ({label} input): ldct {io['slices_per_s']:.0f} slices/s vs plain loop "
              f"{plain['slices_per_s']:.0f} slices/s ({results['io'][label]['speedup']:.2f}x), "
              f"on one core {plain_one['slices_per_s']:.0f} slices/s", flush=True)

    long = (_series(work / f"explicit_{args.long_slices}", args.long_slices, "1.2.840.10008.1.2.1")
            if "memory" in parts else None)
    memory_model = "wgan_vgg" if "wgan_vgg" in models else models[0]
    for label, series in (("short", explicit), ("long", long)) if "memory" in parts else []:
        run = _run_child("denoise", str(_checkpoint(work, memory_model)), str(series),
                         str(work / f"mem_{label}"), dev, bs, "0", workers)
        results["memory"][label] = {"model": memory_model, **run}
        print(f"memory, {memory_model}, {run['slices']} slices: main {run['peak_rss_mb']:.0f} MB, "
              f"largest worker {run['peak_worker_rss_mb']:.0f} MB", flush=True)

    if "tools" in parts:
        results["tools"] = _run_child("tools", str(work), dev)
        results["tools"]["evaluate"] = _run_child("evaluate", str(explicit), dev)
        t = results["tools"]
        print(f"phantom 32x512²: {t['phantom_32x512_s']:.1f} s; simulate: {t['simulate_s_per_slice']:.2f} s "
              f"per 512² slice; dataset: {t['patch_reads_per_s']:.0f} random 64² patches/s", flush=True)

    (args.out / "bench.json").write_text(json.dumps(results, indent=2))
    table = render_table(results)
    (args.out / "bench.md").write_text(table)
    print()
    print(table)


def render_table(results: dict) -> str:
    """The README's benchmark tables, in Markdown."""
    lines = [f"Machine: {results['machine']}; device {results['device']}, batch size "
             f"{results['batch_size']}, {results['workers']} worker processes."]
    if results.get("models"):
        lines += ["", "| model | slices | forward only (slices/s) | end to end (slices/s) | "
                  "end to end / forward | peak RSS main + worker (MB) |", "|---|---|---|---|---|---|"]
    for name, r in results.get("models", {}).items():
        e2e = r["end_to_end"]
        memory = f"{e2e['peak_rss_mb']:.0f} + {e2e['peak_worker_rss_mb']:.0f}"
        if "cuda_peak_mb" in e2e:
            memory += f" (CUDA {e2e['cuda_peak_mb']:.0f})"
        lines.append(f"| {name} | {e2e['slices']} | {r['forward']['slices_per_s']:.2f} | "
                     f"{e2e['slices_per_s']:.2f} | {r['ratio']:.0%} | {memory} |")
    if results.get("io"):
        lines += ["", "| I/O path (`--blend 1`, best of 3) | slices | plain pydicom loop (slices/s) | "
                  "same loop on one core | ldct, 1 worker | ldct, N workers (slices/s) | "
                  "speed-up vs loop / vs loop on one core |", "|---|---|---|---|---|---|---|"]
    for label, r in results.get("io", {}).items():
        lines.append(f"| {label} input | {r['ldct']['slices']} | {r['plain']['slices_per_s']:.0f} | "
                     f"{r['plain_one_core']['slices_per_s']:.0f} | "
                     f"{r['ldct_one_worker']['slices_per_s']:.0f} | {r['ldct']['slices_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x / {r['speedup_one_core']:.2f}x |")
    if results.get("memory"):
        lines += ["", "| memory (end to end) | slices | peak RSS main (MB) | peak RSS largest worker (MB) |",
                  "|---|---|---|---|"]
    for label, r in results.get("memory", {}).items():
        lines.append(f"| {r['model']}, {label} series | {r['slices']} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_worker_rss_mb']:.0f} |")
    if "tools" in results:
        t = results["tools"]
        lines += ["", "| other tools | time |", "|---|---|",
                  f"| `ldct phantom`: 32 slices of 512² (HU volume) | {t['phantom_32x512_s']:.1f} s |",
                  f"| `ldct simulate`: one 512² slice, 720 views (forward projection, noise, FBP) | "
                  f"{t['simulate_s_per_slice']:.2f} s ({t['simulate_slices_per_s']:.2f} slices/s) |",
                  f"| `ldct prepare` dataset: random 64² patches read from the int16 memmap | "
                  f"{t['patch_reads_per_s']:,.0f} patches/s |"]
        if "evaluate" in t:
            e = t["evaluate"]
            lines.append(f"| `ldct evaluate`: {e['slices']} slices of 512² against a reference (reading "
                         f"both, PSNR, SSIM, RMSE, ROIs, NPS) | {e['seconds']:.1f} s "
                         f"({e['slices_per_s']:.0f} slices/s) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
    else:
        main()
