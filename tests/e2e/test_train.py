"""``ldct train`` end to end on small prepared datasets: every recipe, resume, DDP, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ldct_cli.errors import LdctError
from ldct_cli.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from ldct_cli.models.registry import create_model, list_models
from ldct_cli.training.config import resolve_config
from ldct_cli.training.loop import train
from tests.synth import SeriesSpec, write_series
from tests.training_data import make_training_dataset

REPO = Path(__file__).resolve().parents[2]

# Small widths so that every recipe runs in seconds on two cores; the code path is the real one.
SMALL = {
    "redcnn": {"model_kwargs.channels": 8},
    "redcnn_wgan": {"model_kwargs.channels": 8},
    "wgan_vgg": {"model_kwargs.channels": 8},
    "pix2pix": {"model_kwargs.depth": 3, "model_kwargs.base_channels": 8, "model_kwargs.max_channels": 16},
    "pix2pix_small": {"model_kwargs.depth": 3, "model_kwargs.base_channels": 8, "model_kwargs.max_channels": 16},
    "ct_features": {"model_kwargs.channels": 8},
    "cascade": {"model_kwargs.channels": 8, "schedule.stage_steps": [2, 2]},
    "cpca": {"model_kwargs.channels": 8},
}
PERCEPTUAL_MODELS = ("wgan_vgg", "cascade", "cpca")  # their recipes' "auto" perceptual loss falls back to ct
FAST = {"data.patch_size": 32, "data.batch_size": 2, "data.workers": 0, "schedule.val_slices": 2,
        "schedule.log_every": 1}


def _set_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        flags += ["--set", f"{key}={json.dumps(value)}"]
    return flags


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_training_dataset(tmp_path_factory.mktemp("train"), n_cases=2, n_slices=8, size=64)


@pytest.fixture(scope="module")
def ct_weights(tmp_path_factory) -> Path:
    """A small CT feature extractor checkpoint (random weights: the loss path is what is tested)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ct") / "ct_features.safetensors"
    save_checkpoint(create_model("ct_features", channels=8), path)
    return path


def _config(model: str, dataset: Path, ct_weights: Path, **overrides):
    values = {"data.path": str(dataset), **FAST, **SMALL.get(model, {}), "ct_weights": str(ct_weights)}
    values.update(overrides)
    return resolve_config(model=model, overrides=values)


@pytest.mark.parametrize("name", list_models(("generator", "features")))
def test_each_model_trains_through_the_cli_and_its_checkpoint_denoises(name, dataset, ct_weights, cli, tmp_path):
    run = tmp_path / "run"
    values = {**FAST, **SMALL[name], "ct_weights": str(ct_weights)}
    result = cli("train", "--model", name, "--data", dataset, "--out", run, "--max-steps", 4,
                 "--val-every", 2, "--json", *_set_flags(values))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4 and summary["stopped"] == "max_steps"
    assert summary["patches_per_s"] > 0
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "config.json", "curves.png",
                                                     "last.safetensors", "metrics.jsonl", "state.pt"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    # Checkpoints describe themselves: model, config, how it was trained.
    model, info = load_checkpoint(run)
    assert info.model == name and info.config["recipe"] == summary["recipe"]
    assert info.training["step"] == summary["best"]["step"]
    assert info.training["perceptual"] == ("ct" if name in PERCEPTUAL_MODELS else "none")
    if name in PERCEPTUAL_MODELS:  # which extractor shaped the loss, down to its weights' hash
        source = info.training["perceptual_source"]
        assert source["kind"] == "ct" and source["file"] == str(ct_weights)
        assert source["tensors_sha256"] == read_checkpoint_info(ct_weights).tensors_sha256
    assert read_checkpoint_info(run / "last.safetensors").training["step"] == 4
    if name == "ct_features":
        assert "input" not in {r["kind"] for r in records}  # an autoencoder has no low-dose baseline
        refused = cli("denoise", tmp_path / "nowhere", tmp_path / "out", "--weights", run)
        assert refused.exit_code == 2 and "not a denoising generator" in refused.output
        return
    assert records[0]["kind"] == "input" and records[0]["psnr"] > 0
    series = tmp_path / "series"
    write_series(series, SeriesSpec(n_slices=3, rows=64, columns=64))
    denoised = cli("denoise", series, tmp_path / "out", "--weights", run, "--quiet")
    assert denoised.exit_code == 0, denoised.output
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 3


@pytest.mark.parametrize("name", ["redcnn", "wgan_vgg", "pix2pix", "redcnn_wgan", "cascade"])
def test_interrupted_and_resumed_run_gives_the_same_losses(name, dataset, ct_weights, tmp_path):
    """Exact resume on the CPU: critic, optimizers, dropout and penalty RNG, DataLoader workers."""
    settings = {"schedule.checkpoint_every": 2, "schedule.val_every": 100, "data.workers": 1}
    whole = train(_config(name, dataset, ct_weights, **settings, **{"schedule.max_steps": 4}), tmp_path / "a")
    first = train(_config(name, dataset, ct_weights, **settings, **{"schedule.max_steps": 2}), tmp_path / "b")
    assert first.step == 2
    # The CLI's --resume re-reads the run's own config.json with only the step limit changed.
    resumed_config = resolve_config(model=None, config_file=tmp_path / "b" / "config.json",
                                    overrides={"schedule.max_steps": 4})
    second = train(resumed_config, tmp_path / "b", resume=True)
    assert (second.start_step, second.step) == (2, 4)
    assert first.losses + second.losses == whole.losses
    assert second.generator_sha256 == whole.generator_sha256
    # The log of the resumed run reads like the uninterrupted one's.
    def steps(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]
    assert steps(tmp_path / "b") == steps(tmp_path / "a")


def test_ema_checkpoints_hold_the_moving_average_and_resume_exactly(dataset, ct_weights, tmp_path):
    """ema_decay: best/last hold the average, state.pt the raw weights; after one step the
    average is 0.1 * initial + 0.9 * trained (the warm-up decay 1/10 at step 0)."""
    from safetensors.torch import load_file

    settings = {"ema_decay": 0.999, "schedule.checkpoint_every": 1, "schedule.val_every": 100}
    one = train(_config("redcnn", dataset, ct_weights, **settings, **{"schedule.max_steps": 1}), tmp_path / "one")
    torch.manual_seed(0)  # the loop's seed before it builds the generator
    initial = create_model("redcnn", channels=8).state_dict()
    trained = torch.load(tmp_path / "one" / "state.pt", weights_only=True)["generator"]
    saved = load_file(str(tmp_path / "one" / "last.safetensors"))
    for name, value in trained.items():
        expected = 0.1 * initial[name] + 0.9 * value
        torch.testing.assert_close(saved[name], expected, rtol=1e-5, atol=1e-7)
        assert not torch.equal(saved[name], value), name
    assert one.step == 1

    whole = train(_config("redcnn", dataset, ct_weights, **settings, **{"schedule.max_steps": 4}), tmp_path / "a")
    train(_config("redcnn", dataset, ct_weights, **settings, **{"schedule.max_steps": 2}), tmp_path / "b")
    train(resolve_config(model=None, config_file=tmp_path / "b" / "config.json",
                         overrides={"schedule.max_steps": 4}), tmp_path / "b", resume=True)
    a, b = (load_file(str(tmp_path / run / "last.safetensors")) for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.step == 4


def test_keep_every_keeps_loadable_generators_of_those_steps(dataset, ct_weights, tmp_path):
    from ldct_cli.checkpoint import load_checkpoint

    config = _config("redcnn", dataset, ct_weights, **{"schedule.max_steps": 5, "schedule.keep_every": 2,
                                                       "schedule.checkpoint_every": 100, "schedule.val_every": 100})
    train(config, tmp_path / "run")
    kept = sorted(p.name for p in (tmp_path / "run" / "steps").iterdir())
    assert kept == ["step_000002.safetensors", "step_000004.safetensors"]
    model, info = load_checkpoint(tmp_path / "run" / "steps" / kept[0])
    assert info.training["step"] == 2 and info.model == "redcnn"


def test_resume_drops_log_records_after_the_saved_step(dataset, ct_weights, tmp_path):
    config = _config("redcnn", dataset, ct_weights, **{"schedule.max_steps": 3, "schedule.checkpoint_every": 2,
                                                       "schedule.val_every": 100})
    train(config, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 3
    # A crash after step 3's log line but before a later save: pretend the state is older.
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 9, "kind": "train", "loss": 1.0}) + "\n")
    result = train(resolve_config(model=None, config_file=tmp_path / "run" / "config.json",
                                  overrides={"schedule.max_steps": 4}), tmp_path / "run", resume=True)
    assert result.step == 4
    assert [r["step"] for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "train"] == [1, 2, 3, 4]


def test_resuming_a_finished_run_returns_at_once(dataset, ct_weights, tmp_path):
    config = _config("redcnn", dataset, ct_weights, **{"schedule.max_steps": 2, "schedule.val_every": 100})
    first = train(config, tmp_path / "run")
    again = train(resolve_config(model=None, config_file=tmp_path / "run" / "config.json"), tmp_path / "run",
                  resume=True)
    assert (again.start_step, again.step, again.stopped, again.stop_signal) == (2, 2, "max_steps", None)
    assert again.generator_sha256 == first.generator_sha256 and again.losses == []


def test_short_run_loss_falls(dataset, ct_weights, tmp_path):
    """Real optimisation: 30 RED-CNN steps on noisy phantom patches at least halve the MSE."""
    config = _config("redcnn", dataset, ct_weights, **{"schedule.max_steps": 30, "schedule.val_every": 30,
                                                       "data.batch_size": 4, "model_kwargs.channels": 16,
                                                       "optimizer.lr": 1e-3})
    result = train(config, tmp_path / "run")
    losses = [l["loss"] for l in result.losses]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_plateau_halves_the_learning_rate_and_early_stopping_ends_the_run(dataset, ct_weights, tmp_path):
    """redcnn_wgan's schedule: with a learning rate too small to move any weight, no validation
    after the first is a new best, so the plateau and early-stopping counters run out."""
    tiny = {"optimizer.lr": 1e-30, "critic_optimizer.lr": 1e-30, "schedule.val_every": 1,
            "schedule.plateau_patience": 1, "schedule.early_stop_patience": 3, "schedule.max_steps": 50}
    result = train(_config("redcnn_wgan", dataset, ct_weights, **tiny), tmp_path / "run")
    # Validations at steps 1 (best), 2, 3, 4: reductions after the 2nd and 4th bad ones... the
    # 3rd bad validation (step 4) stops the run.
    assert (result.stopped, result.step, result.best["step"]) == ("early_stop", 4, 1)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["plateau"] == {"lr_scale": 0.5, "since_reduce": 1, "since_best": 3}
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if r["kind"] == "train"]
    assert lrs == [1e-30, 1e-30, 1e-30, 0.5e-30]


def test_max_minutes_stops_and_saves(dataset, ct_weights, tmp_path):
    config = _config("redcnn", dataset, ct_weights, **{"schedule.max_minutes": 1e-6, "schedule.val_every": 100,
                                                       "schedule.checkpoint_every": 100})
    result = train(config, tmp_path / "run")
    assert (result.stopped, result.step) == ("max_minutes", 1)
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 1


class _RenameAfterFirstValidation:
    """What a user did: ``mv runs/a runs/b`` while ``runs/a`` still trained, then a new ``runs/a``."""

    def __init__(self, run_dir: Path, moved_to: Path):
        self.run_dir, self.moved_to = run_dir, moved_to

    def started(self, **_) -> None:
        pass

    def stepped(self, *_) -> None:
        pass

    def validated(self, step, metrics, *, best) -> None:
        self.run_dir.rename(self.moved_to)
        self.run_dir.mkdir()
        (self.run_dir / "config.json").write_text("{}")  # the other run's


def test_a_run_whose_folder_is_renamed_stops_instead_of_writing_into_the_new_one(dataset, ct_weights, tmp_path):
    config = _config("redcnn", dataset, ct_weights, **{"schedule.max_steps": 8, "schedule.val_every": 4,
                                                       "schedule.checkpoint_every": 2})
    run_dir, moved = tmp_path / "a", tmp_path / "b"
    with pytest.raises(LdctError, match="moved, removed or replaced"):
        train(config, run_dir, progress=_RenameAfterFirstValidation(run_dir, moved))
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json"]
    assert (run_dir / "config.json").read_text() == "{}"
    # The moved folder is a consistent run that stopped at its last save, and resumes.
    assert torch.load(moved / "state.pt", weights_only=True)["step"] == 2
    result = train(resolve_config(model=None, config_file=moved / "config.json",
                                  overrides={"schedule.max_steps": 5}), moved, resume=True)
    assert result.step == 5


def test_init_warm_starts_from_a_checkpoint_of_the_same_model(dataset, ct_weights, cli, tmp_path):
    """CNN-MSE first, then WGAN-VGG from its weights: the run starts where the first ended."""
    first = train(resolve_config(model=None, config_file="cnn_mse", overrides={
        "data.path": str(dataset), **FAST, **SMALL["wgan_vgg"], "schedule.max_steps": 3,
        "schedule.val_every": 3}), tmp_path / "cnn_mse")
    assert first.step == 3
    source, source_info = load_checkpoint(tmp_path / "cnn_mse" / "last.safetensors")
    # A learning rate too small to move the weights: what the second run holds is what it loaded.
    second = train(_config("wgan_vgg", dataset, ct_weights, **{
        "init": str(tmp_path / "cnn_mse" / "last.safetensors"), "schedule.max_steps": 1,
        "schedule.val_every": 1, "optimizer.lr": 1e-30}), tmp_path / "wgan")
    assert second.step == 1
    warm, info = load_checkpoint(tmp_path / "wgan" / "last.safetensors")
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(warm.state_dict()[name], tensor, rtol=0, atol=1e-12)
    assert info.training["init"]["tensors_sha256"] == source_info.tensors_sha256
    assert info.training["init"]["recipe"] == "supervised"
    # Without --init the same run starts from fresh weights.
    cold = train(_config("wgan_vgg", dataset, ct_weights, **{
        "schedule.max_steps": 1, "schedule.val_every": 1, "optimizer.lr": 1e-30}), tmp_path / "cold")
    assert cold.step == 1
    fresh, fresh_info = load_checkpoint(tmp_path / "cold" / "last.safetensors")
    assert fresh_info.training["init"] is None
    assert not torch.equal(fresh.state_dict()["net.0.weight"], source.state_dict()["net.0.weight"])
    # Another model's checkpoint is refused before anything is written.
    result = cli("train", "--model", "redcnn", "--data", dataset, "--out", tmp_path / "bad",
                 "--init", tmp_path / "cnn_mse", *_set_flags({**FAST, **SMALL["redcnn"]}))
    assert result.exit_code == 2, result.output
    assert "--init needs a checkpoint of redcnn" in result.output
    assert not (tmp_path / "bad").exists()


def _ddp_worker(rank: int, world: int, port: int, config_json: str, run: str, results: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    config = resolve_config(model=None, config_file=config_json)
    result = train(config, run)
    Path(results, f"rank{rank}.json").write_text(json.dumps(
        {"sha": result.generator_sha256, "step": result.step, "world": result.world_size,
         "losses": [l["loss"] for l in result.losses]}))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["redcnn", "wgan_vgg"])
def test_ddp_gloo_two_processes_average_gradients_and_only_rank0_writes(name, dataset, ct_weights, tmp_path):
    import socket

    import torch.multiprocessing as mp

    config = _config(name, dataset, ct_weights, **{"schedule.max_steps": 3, "schedule.val_every": 3,
                                                   "device": "cpu"})
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(config.to_dict()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_ddp_worker, args=(2, port, str(config_json), str(tmp_path / "run"), str(results)), nprocs=2)
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    # Averaged gradients keep the replicas identical although each rank drew other patches...
    assert ranks[0]["sha"] == ranks[1]["sha"]
    assert ranks[0]["losses"] != ranks[1]["losses"]
    # ... and the single checkpoint on disk is that generator.
    _, info = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert info.tensors_sha256 == ranks[0]["sha"] and info.training["world_size"] == 2
    single = train(config, tmp_path / "single")
    assert single.generator_sha256 != ranks[0]["sha"]  # two ranks saw twice the patches


@pytest.mark.slow
@pytest.mark.parametrize("sig, group, workers", [
    (signal.SIGINT, False, 0),  # Ctrl-C to the training process alone
    (signal.SIGINT, True, 1),  # Ctrl-C in a terminal: the whole group, DataLoader workers too
    (signal.SIGTERM, True, 1),  # a job scheduler stopping every process of the job
])
def test_ctrl_c_saves_state_and_the_run_resumes(dataset, tmp_path, sig, group, workers):
    run = tmp_path / "run"
    values = {**FAST, **SMALL["redcnn"], "schedule.checkpoint_every": 10_000, "schedule.val_every": 10_000,
              "data.workers": workers}
    cmd = [sys.executable, "-m", "ldct_cli", "train", "--model", "redcnn", "--data", str(dataset),
           "--out", str(run), "--max-steps", "100000", "--quiet", *_set_flags(values)]
    # Its own process group, with the default Ctrl-C disposition (a background job of a
    # shell would otherwise inherit SIGINT ignored).
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if log.is_file() and '"kind": "train"' in log.read_text():
            break
        time.sleep(0.2)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr  # 130 for Ctrl-C, 143 for SIGTERM
    assert "--resume" in stderr and "Traceback" not in stderr
    saved = torch.load(run / "state.pt", weights_only=True)["step"]
    assert saved >= 1
    assert read_checkpoint_info(run / "last.safetensors").training["step"] == saved
    resumed = subprocess.run([sys.executable, "-m", "ldct_cli", "train", "--resume", str(run),
                              "--max-steps", str(saved + 2), "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == saved + 2


def test_cli_refuses_bad_requests_with_one_line(dataset, ct_weights, cli, tmp_path):
    def fails(*args, code=2):
        result = cli("train", *args)
        assert result.exit_code == code, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        return lines[0]

    assert "--out RUN_DIR is required" in fails("--model", "redcnn", "--data", dataset)
    assert "--data DATASET is required" in fails("--model", "redcnn", "--out", tmp_path / "r")
    assert "not a dataset" in fails("--model", "redcnn", "--data", tmp_path, "--out", tmp_path / "r")
    assert "unknown model" in fails("--model", "unet", "--data", dataset, "--out", tmp_path / "r")
    assert "unknown key(s) batch" in fails("--model", "redcnn", "--data", dataset, "--out", tmp_path / "r",
                                           "--set", "data.batch=3")
    assert "expected KEY=VALUE" in fails("--model", "redcnn", "--data", dataset, "--out", tmp_path / "r",
                                         "--set", "data.batch_size")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert "not empty" in fails("--model", "redcnn", "--data", dataset, "--out", busy)
    assert (busy / "notes.txt").read_text() == "mine"
    assert "no config.json" in fails("--resume", tmp_path / "nothing")
    assert "only --max-steps" in fails("--resume", busy, "--lr", "0.1")
    assert "multiple of 8" in fails("--model", "pix2pix", "--data", dataset, "--out", tmp_path / "p",
                                    "--patch-size", "36", *_set_flags(SMALL["pix2pix"]))
    missing = fails("--model", "wgan_vgg", "--data", dataset, "--out", tmp_path / "w", "--perceptual", "vgg19",
                    "--vgg-weights", tmp_path / "vgg19-dcbb9e9d.pth", *_set_flags({**FAST, **SMALL["wgan_vgg"]}))
    assert "vgg19-dcbb9e9d.pth" in missing and "--vgg-weights" in missing
    too_big = fails("--model", "redcnn", "--data", dataset, "--out", tmp_path / "big", "--patch-size", "128")
    assert "smaller than" in too_big
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


def test_cascade_trains_its_levels_in_order(dataset, ct_weights, cli, tmp_path):
    """Stage 1 moves DRL only, stage 2 the difference network only; checkpoints say how many
    levels are trained, and a checkpoint from stage 1 denoises with DRL alone."""
    steps = {"schedule.stage_steps": [2, 3], "schedule.val_every": 2, "schedule.checkpoint_every": 2}
    torch.manual_seed(0)
    fresh = create_model("cascade", channels=8).state_dict()
    first = train(_config("cascade", dataset, ct_weights, **steps, **{"schedule.max_steps": 2}), tmp_path / "a")
    after_drl, info = load_checkpoint(tmp_path / "a" / "last.safetensors")
    assert int(after_drl.trained_levels) == 1 and first.losses[0]["stage"] == 1.0
    state = after_drl.state_dict()
    moved = {k for k in fresh if k != "trained_levels" and not torch.equal(fresh[k], state[k])}
    assert moved and all(k.startswith("drl.convs.") for k in moved)
    x = torch.rand(1, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(after_drl.eval()(x), after_drl.drl(x))
    resumed = resolve_config(model=None, config_file=tmp_path / "a" / "config.json",
                             overrides={"schedule.max_steps": 5})
    second = train(resumed, tmp_path / "a", resume=True)
    assert [l["stage"] for l in second.losses] == [2.0, 2.0, 2.0]
    assert all("perceptual" not in l for l in second.losses)  # the difference network learns on MSE
    cascade, _ = load_checkpoint(tmp_path / "a" / "last.safetensors")
    assert int(cascade.trained_levels) == 2
    later = cascade.state_dict()
    changed = {k for k in later if not torch.equal(later[k], state[k])}
    assert changed and all(k.startswith("diffs.0.") or k == "trained_levels" for k in changed)
    # The stages must add up to the cascade's levels.
    bad = cli("train", "--model", "cascade", "--data", dataset, "--out", tmp_path / "bad",
              *_set_flags({**FAST, **SMALL["cascade"], "ct_weights": str(ct_weights),
                           "schedule.stage_steps": [2]}))
    assert bad.exit_code == 2 and "2-level cascade needs 2" in bad.output
    assert not (tmp_path / "bad").exists()
    other = cli("train", "--model", "redcnn", "--data", dataset, "--out", tmp_path / "bad",
                "--set", "recipe=cascade")
    assert other.exit_code == 2 and "cascade recipe is for the cascade model" in other.output


def test_cpca_3d_starts_from_a_2d_run_exactly_as_good_and_denoises_with_neighbours(dataset, ct_weights, cli,
                                                                                   tmp_path):
    """Seed 003's transfer: the 2.5D CPCA initialised from a 2D one gives the 2D model's output."""
    two_d = train(_config("cpca", dataset, ct_weights, **{"schedule.max_steps": 2, "schedule.val_every": 2}),
                  tmp_path / "2d")
    values = {"data.path": str(dataset), **FAST, **SMALL["cpca"], "ct_weights": str(ct_weights),
              "init": str(tmp_path / "2d" / "last.safetensors"), "schedule.max_steps": 1,
              "schedule.val_every": 1, "optimizer.lr": 1e-30, "critic_optimizer.lr": 1e-30}
    three_d = train(resolve_config(model=None, config_file="cpca_3d", overrides=values), tmp_path / "3d")
    assert three_d.best["psnr"] == pytest.approx(two_d.last_val["psnr"], abs=1e-4)
    _, info = load_checkpoint(tmp_path / "3d" / "last.safetensors")
    assert info.model_kwargs["in_slices"] == 3 and info.training["init"]["inflated_from_2d"] is True
    # A 2.5D checkpoint cannot start a 2D run, nor a 3-slice one a 5-slice run.
    refused = cli("train", "--model", "cpca", "--data", dataset, "--out", tmp_path / "bad",
                  "--init", tmp_path / "3d", *_set_flags({**FAST, **SMALL["cpca"], "ct_weights": str(ct_weights)}))
    assert refused.exit_code == 2 and "--init needs a checkpoint of cpca" in refused.output
    # ldct denoise feeds each slice with its neighbours (replicated at the ends).
    series = tmp_path / "series"
    write_series(series, SeriesSpec(n_slices=4, rows=48, columns=48))
    denoised = cli("denoise", series, tmp_path / "out", "--weights", tmp_path / "3d", "--quiet")
    assert denoised.exit_code == 0, denoised.output
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 4


def test_redcnn_wgan_starts_from_a_redcnn_checkpoint(dataset, ct_weights, tmp_path):
    """The same network under another recipe (Ryu's RED-CNN + WGAN-GP fine-tunes RED-CNN adversarially)."""
    train(_config("redcnn", dataset, ct_weights, **{"schedule.max_steps": 1, "schedule.val_every": 1}),
          tmp_path / "mse")
    source, source_info = load_checkpoint(tmp_path / "mse" / "last.safetensors")
    tiny = {"optimizer.lr": 1e-30, "critic_optimizer.lr": 1e-30, "schedule.max_steps": 1, "schedule.val_every": 1,
            "init": str(tmp_path / "mse" / "last.safetensors")}
    train(_config("redcnn_wgan", dataset, ct_weights, **tiny), tmp_path / "wgan")
    warm, info = load_checkpoint(tmp_path / "wgan" / "last.safetensors")
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(warm.state_dict()[name], tensor, rtol=0, atol=1e-12)
    assert info.model == "redcnn_wgan" and info.training["init"]["tensors_sha256"] == source_info.tensors_sha256
    with pytest.raises(Exception, match="--init needs a checkpoint of redcnn_wgan"):
        train(_config("redcnn_wgan", dataset, ct_weights, **{**tiny, "model_kwargs.channels": 4}), tmp_path / "w2")


def test_resume_accepts_flags_that_repeat_the_saved_values(dataset, cli, tmp_path):
    run = tmp_path / "run"
    flags = _set_flags({**FAST, **SMALL["redcnn"]})
    first = cli("train", "--model", "redcnn", "--data", dataset, "--out", run, "--max-steps", "2",
                "--val-every", "2", "--quiet", *flags)
    assert first.exit_code == 0, first.output
    again = cli("train", "--resume", run, "--data", dataset.resolve(), "--max-steps", "3", "--quiet")
    assert again.exit_code == 0, again.output
    other = cli("train", "--resume", run, "--data", tmp_path, "--max-steps", "4", "--quiet")
    assert other.exit_code == 2 and "not data.path" in other.output
