"""``ldct denoise`` on every real CT series in ../shared/data/ct (skipped when it is absent).

The whole tree is denoised twice per session with ``--blend 1`` (the I/O path alone: the
output must hold the source's stored values exactly), once with the default transfer
syntax and once with ``--transfer-syntax keep``; every test below checks those two runs
(``run``) or one of them. One real-model run on four head slices checks padding,
rescale and the Bits Stored range. Outputs are validated with dicom3tools
(``tests/dicomcheck.py``) and read back with SimpleITK as a viewer would.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ldct_cli.dicom.read import Series, SliceHeader, discover

pytestmark = [pytest.mark.realdata,
              pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")]

ENHANCED_CT_SAMPLE = "eCT_Supplemental.dcm"  # the only file discovery must skip as not supported
# pydicom's samples hold one image in several transfer syntaxes under one SOP Instance UID and
# position: exact duplicates, skipped, naming the file kept.
DUPLICATE_SAMPLES = {"693_UNCI.dcm": "693_J2KI.dcm", "693_UNCR.dcm": "693_J2KR.dcm"}

EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LOSSLESS = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
         "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}  # .91/.203 unless the source says "00"
MAYBE_LOSSLESS = {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}  # JPEG 2000, HTJ2K: either
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

# A real sample whose SOP Instance UID is a hex digest, not a UID: its output must not
# copy that value into a reference (dciodvfy: "Illegal root for UID").
INVALID_SOURCE_UID_FILE = "bad_sequence.dcm"


# ---------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------

@dataclass
class SeriesOutput:
    """One input series, its summary entry, and each output file paired with its source."""

    series: Series
    result: dict
    files: list[Path]
    pairs: list[tuple[SliceHeader, Path]] = field(default_factory=list)
    unpaired: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.series.folder.name}/{self.series.series_uid or '<no series uid>'}"


@dataclass
class Run:
    mode: str
    out: Path
    exit_code: int
    summary: dict
    stderr: str
    seconds: float
    outputs: list[SeriesOutput] = field(default_factory=list)


def _invoke(*args) -> tuple[int, str, str]:
    """``ldct ARGS`` in-process (the conftest ``cli`` fixture is function-scoped)."""
    from typer.testing import CliRunner

    from ldct_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _source_of(ds: pydicom.Dataset, series: Series, by_uid: dict[str, list[SliceHeader]],
               used: set[Path]) -> SliceHeader | None:
    """The source slice of an output: by Source Image Sequence, else by Image Position.

    A Source Image Sequence citing no slice of the series (a stale one inherited from a
    source with an empty SOP Instance UID) falls back to the position too; a test below
    reports it.
    """
    candidates: list[SliceHeader] = []
    sources = ds.get("SourceImageSequence")
    if sources:
        candidates = by_uid.get(str(sources[0].get("ReferencedSOPInstanceUID", "")), [])
    if not candidates and "ImagePositionPatient" in ds:
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        candidates = [s for s in series.slices
                      if s.position is not None and np.allclose(s.position, position, atol=1e-3)]
    # Several sources may share a UID or a position: take them in slice order.
    candidates = [c for c in candidates if c.path not in used]
    return candidates[0] if candidates else None


def _pair_outputs(item: SeriesOutput) -> None:
    """Fill ``item.pairs`` (and ``item.unpaired``); never raises, so that failures show in tests."""
    by_uid: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in item.series.slices:
        if header.sop_instance_uid:
            by_uid[header.sop_instance_uid].append(header)
    used: set[Path] = set()
    for path in item.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        source = _source_of(ds, item.series, by_uid, used)
        if source is None:
            item.unpaired.append(path)
            continue
        used.add(source.path)
        item.pairs.append((source, path))


def _denoise_all(shared_ct: Path, weights: Path, out: Path, mode: str, discovery) -> Run:
    start = time.perf_counter()
    code, stdout, stderr = _invoke("denoise", shared_ct, out, "--weights", weights, "--blend", "1",
                                   "--json", "--quiet", "--transfer-syntax", mode)
    run = Run(mode=mode, out=out, exit_code=code, summary=json.loads(stdout), stderr=stderr,
              seconds=time.perf_counter() - start)
    results = {(r["input"], r["series_uid"]): r for r in run.summary["series"]}
    for series in discovery.series:
        result = results.get((str(series.folder), series.series_uid))
        if result is None:  # test_every_series_done reports it
            continue
        files = sorted(Path(result["output"]).glob("*.dcm")) if result["output"] else []
        item = SeriesOutput(series=series, result=result, files=files)
        if result["status"] == "done":
            _pair_outputs(item)
        run.outputs.append(item)
    return run


@pytest.fixture(scope="module")
def discovery(shared_ct):
    return discover(shared_ct)


@pytest.fixture(scope="module")
def explicit_run(shared_ct, checkpoints, discovery, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("realdata-explicit") / "out"
    return _denoise_all(shared_ct, checkpoints["wgan_vgg"], out, "explicit", discovery)


@pytest.fixture(scope="module")
def keep_run(shared_ct, checkpoints, discovery, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("realdata-keep") / "out"
    return _denoise_all(shared_ct, checkpoints["wgan_vgg"], out, "keep", discovery)


@pytest.fixture(scope="module", params=["explicit", "keep"])
def run(request) -> Run:
    return request.getfixturevalue(f"{request.param}_run")


def _sample(pairs: list) -> list:
    """First, middle and last slice."""
    return [pairs[i] for i in sorted({0, len(pairs) // 2, len(pairs) - 1})] if pairs else []


def _has_duplicate_source_uids(series: Series) -> bool:
    uids = [s.sop_instance_uid for s in series.slices if s.sop_instance_uid]
    return len(uids) != len(set(uids))


_PIXEL_DIGESTS: dict[Path, str] = {}  # source pixels, decoded once for both runs


def _digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(f"{pixels.dtype}{pixels.shape}".encode()
                          + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _source_digest(path: Path) -> str:
    if path not in _PIXEL_DIGESTS:
        _PIXEL_DIGESTS[path] = _digest(pydicom.dcmread(path).pixel_array)
    return _PIXEL_DIGESTS[path]


# ---------------------------------------------------------------------------------------
# Summary, pixels, UIDs
# ---------------------------------------------------------------------------------------

def test_every_series_done(run, discovery, shared_ct):
    assert run.exit_code == 0, run.stderr
    assert run.summary["exit_code"] == 0
    assert run.summary["failed_files"] == []
    skipped = {Path(f["path"]).name: f["reason"] for f in run.summary["skipped_files"]}
    assert sorted(skipped) == sorted([ENHANCED_CT_SAMPLE, *DUPLICATE_SAMPLES])
    for copy, kept in DUPLICATE_SAMPLES.items():
        assert skipped[copy].startswith("duplicate of ") and kept in skipped[copy]
    listed = [(r["input"], r["series_uid"]) for r in run.summary["series"]]
    assert listed == [(str(s.folder), s.series_uid) for s in discovery.series] and listed
    assert len(run.outputs) == len(discovery.series)
    for item in run.outputs:
        assert item.result["status"] == "done", (item.name, item.result["error"])
        assert item.result["slices"] == item.series.n_slices
        assert len(item.files) == item.series.n_slices, item.name
        assert not item.unpaired, f"{item.name}: no source slice found for {item.unpaired}"
        assert len(item.pairs) == item.series.n_slices, item.name
    assert not list(run.out.rglob(".ldct-partial-*")), "staging folders left behind"


def test_blend1_round_trip_is_exact(run):
    """--blend 1: every output slice stores exactly its source slice's values."""
    mismatched = []
    for item in run.outputs:
        for source, output in item.pairs:
            ds = pydicom.dcmread(output)
            if _digest(ds.pixel_array) != _source_digest(source.path):
                src = pydicom.dcmread(source.path).pixel_array
                out = ds.pixel_array
                detail = (f"shape {out.shape} vs {src.shape}" if out.shape != src.shape else
                          f"{int(np.count_nonzero(out != src))} pixels differ, dtype {out.dtype} vs {src.dtype}")
                mismatched.append(f"{output.relative_to(run.out)} <- {source.path.name}: {detail}")
    assert not mismatched, "\n".join(mismatched)


def _source_references(run: Run) -> list[str]:
    """Outputs whose Source Image Sequence does not cite exactly their source slice."""
    wrong = []
    for item in run.outputs:
        for source, output in item.pairs:
            ds = pydicom.dcmread(output, stop_before_pixels=True)
            cited = [str(i.get("ReferencedSOPInstanceUID", "")) for i in ds.get("SourceImageSequence") or []]
            # A source UID that is not a valid UID cannot be referenced validly: none is cited.
            valid = UID_RE.match(source.sop_instance_uid) and len(source.sop_instance_uid) <= 64
            expected = [source.sop_instance_uid] if valid else []
            if cited != expected:
                wrong.append(f"{output.relative_to(run.out)} cites {cited}, source {expected}")
    return wrong


def test_source_image_sequence_cites_the_source(run):
    wrong = _source_references(run)
    assert not wrong, "\n".join(wrong)


def _input_uids(shared_ct: Path) -> set[str]:
    uids = set()
    for path in shared_ct.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
            uids.add(str(ds.get(keyword, "") or ""))
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            uids.add(str(meta.get("MediaStorageSOPInstanceUID", "") or ""))
    uids.discard("")
    return uids


@pytest.fixture(scope="module")
def input_uids(shared_ct) -> set[str]:
    return _input_uids(shared_ct)


def test_output_uids_are_new_and_valid(run, input_uids):
    series_uids = []
    for item in run.outputs:
        seen_series = set()
        for source, output in item.pairs:
            ds = pydicom.dcmread(output, stop_before_pixels=True)
            sop, series_uid = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
            for uid in (sop, series_uid):
                assert uid not in input_uids, f"{output}: output UID {uid} is an input UID"
                assert len(uid) <= 64 and UID_RE.match(uid), f"{output}: invalid UID {uid!r}"
            assert str(ds.file_meta.MediaStorageSOPInstanceUID) == sop
            assert str(ds.file_meta.MediaStorageSOPClassUID) == str(ds.SOPClassUID)
            seen_series.add(series_uid)
        assert seen_series == {item.result["output_series_uid"]}, item.name
        series_uids.append(item.result["output_series_uid"])
    assert len(series_uids) == len(set(series_uids)), "two output series share a Series Instance UID"


def test_output_sop_uids_unique(run):
    """Every output slice has its own SOP Instance UID, across all series."""
    counts = Counter()
    for item in run.outputs:
        for _, output in item.pairs:
            counts[str(pydicom.dcmread(output, stop_before_pixels=True).SOPInstanceUID)] += 1
    assert counts and max(counts.values()) == 1, [u for u, n in counts.items() if n > 1]


def test_duplicate_source_sop_uids_get_distinct_output_uids(run):
    items = [item for item in run.outputs if _has_duplicate_source_uids(item.series)]
    if not items:
        pytest.skip("no real series with duplicated source SOP Instance UIDs")
    for item in items:
        uids = [str(pydicom.dcmread(o, stop_before_pixels=True).SOPInstanceUID) for _, o in item.pairs]
        assert len(uids) == len(set(uids)), f"{item.name}: duplicate output SOP Instance UIDs"


def test_lossy_compression_flag_kept(run):
    """Pixels that were ever lossy compressed stay flagged "01", whatever the output syntax."""
    checked = 0
    for item in run.outputs:
        for source, output in item.pairs:
            src = pydicom.dcmread(source.path, stop_before_pixels=True)
            lossy_syntax = source.transfer_syntax in LOSSY and not (
                source.transfer_syntax in MAYBE_LOSSLESS and src.get("LossyImageCompression") == "00")
            if not (lossy_syntax or src.get("LossyImageCompression") == "01"):
                continue
            ds = pydicom.dcmread(output, stop_before_pixels=True)
            assert ds.get("LossyImageCompression") == "01", output
            if lossy_syntax:
                assert ds.get("LossyImageCompressionMethod"), output
            checked += 1
    assert checked, "no lossy source in the real data"


# ---------------------------------------------------------------------------------------
# Transfer syntaxes
# ---------------------------------------------------------------------------------------

def _keep_expected(source_syntax: str) -> str:
    if source_syntax in (RLE, J2K_LOSSLESS, JPEG_LS_LOSSLESS, DEFLATED):
        return source_syntax
    if source_syntax in JPEG_LOSSLESS:
        return JPEG_LS_LOSSLESS
    return EXPLICIT_LE


def _syntax(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def test_default_syntax_is_explicit_vr_le(explicit_run):
    for item in explicit_run.outputs:
        for _, output in item.pairs:
            assert _syntax(output) == EXPLICIT_LE, output


def test_keep_syntax(keep_run, shared_ct):
    by_source: dict[str, str] = {}
    for item in keep_run.outputs:
        for source, output in item.pairs:
            syntax = _syntax(output)
            by_source[str(source.path.relative_to(shared_ct))] = syntax
            assert syntax == _keep_expected(source.transfer_syntax), \
                f"{source.path.name} ({source.transfer_syntax}) -> {syntax}"
            if source.transfer_syntax in LOSSY:
                assert pydicom.dcmread(output, stop_before_pixels=True).LossyImageCompression == "01"
    # The cases named in the brief, so a change of data cannot silently empty the loop above.
    abdomen = {k: v for k, v in by_source.items() if k.startswith("philips_abdomen_rle_275/")}
    assert len(abdomen) == 275 and set(abdomen.values()) == {RLE}
    j2k = {k: v for k, v in by_source.items() if k.startswith("siemens_j2k_20/")}
    assert len(j2k) == 20 and set(j2k.values()) == {J2K_LOSSLESS}
    for name in ("CT1_JPLL", "CT2_JPLL"):
        assert by_source[f"wg04_transfer_syntaxes/{name}"] == JPEG_LS_LOSSLESS
    for name in ("CT1_J2KI", "CT2_J2KI", "CT1_JLSN", "CT2_JLSN"):
        assert by_source[f"wg04_transfer_syntaxes/{name}"] == EXPLICIT_LE


# ---------------------------------------------------------------------------------------
# dicom3tools
# ---------------------------------------------------------------------------------------

def test_dciodvfy_no_new_errors(run):
    """First, middle and last slice of every series: no error its source did not have."""
    from tests.dicomcheck import new_errors

    problems = []
    for item in run.outputs:
        for source, output in _sample(item.pairs):
            errors = new_errors(source.path, output)
            if errors:
                problems.append(f"{output.relative_to(run.out)} (source {source.path.name}):\n  "
                                + "\n  ".join(sorted(errors)))
    assert not problems, "\n".join(problems)


def test_dciodvfy_invalid_source_uid_not_copied(run):
    from tests.dicomcheck import new_errors

    pairs = [(s, o) for item in run.outputs for s, o in item.pairs if s.path.name == INVALID_SOURCE_UID_FILE]
    if not pairs:
        pytest.skip(f"{INVALID_SOURCE_UID_FILE} not in the real data")
    for source, output in pairs:
        assert not new_errors(source.path, output)


def test_dcentvfy_each_output_series(run):
    from tests.dicomcheck import dcentvfy_errors

    problems = []
    for item in run.outputs:
        errors = dcentvfy_errors(item.files)
        if errors:
            problems.append(f"{item.name}:\n  " + "\n  ".join(errors))
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------
# SimpleITK reads the output series as it reads the input series
# ---------------------------------------------------------------------------------------

def _sitk_geometry(folder: Path, series_uid: str, n_expected: int):
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) > 1:
        assert series_uid in ids, f"{folder}: GDCM series IDs {ids} lack {series_uid}"
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    else:
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    assert len(files) == n_expected, f"{folder}: SimpleITK found {len(files)} of {n_expected} files"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = reader.Execute()
    return image.GetSize(), image.GetOrigin(), image.GetSpacing(), image.GetDirection()


def test_simpleitk_reads_output_geometry(explicit_run):
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # tilt / uneven spacing warnings
    duplicated = {Path(f["path"]).parent for f in explicit_run.summary["skipped_files"]
                  if f["reason"].startswith("duplicate of ")}
    try:
        checked = 0
        for item in explicit_run.outputs:
            n = item.series.n_slices
            if n < 2 or item.series.folder in duplicated:  # SimpleITK reads the duplicates too
                continue
            size_in, *geometry_in = _sitk_geometry(item.series.folder, item.series.series_uid, n)
            size_out, *geometry_out = _sitk_geometry(Path(item.result["output"]),
                                                     item.result["output_series_uid"], n)
            assert size_out == size_in, item.name
            for name, a, b in zip(("origin", "spacing", "direction"), geometry_in, geometry_out):
                assert np.allclose(a, b, atol=1e-4), f"{item.name}: {name} {b} != input {a}"
            checked += 1
        assert checked >= 4
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


# ---------------------------------------------------------------------------------------
# A real model (random weights) on a small real series with Pixel Padding Value
# ---------------------------------------------------------------------------------------

def test_real_model_keeps_padding_rescale_and_range(shared_ct, tmp_path, checkpoints, cli):
    source_folder = shared_ct / "ge_head_tilt_28"
    if not source_folder.is_dir():
        pytest.skip("ge_head_tilt_28 not in the real data")
    src = tmp_path / "in"
    src.mkdir()
    for path in sorted(source_folder.glob("*.dcm"))[:4]:
        shutil.copy(path, src / path.name)
    out = tmp_path / "out"
    result = cli("denoise", src, out, "--weights", checkpoints["wgan_vgg"], "--workers", "0",
                 "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [s["status"] for s in summary["series"]] == ["done"]

    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in src.iterdir()}
    outputs = sorted(out.rglob("*.dcm"))
    assert len(outputs) == 4
    changed = 0
    for output in outputs:
        ds = pydicom.dcmread(output)
        source = pydicom.dcmread(sources[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)])
        stored, original = ds.pixel_array, source.pixel_array
        padding_value = int(source.PixelPaddingValue)
        assert padding_value == -1500 and int(ds.PixelPaddingValue) == padding_value
        padding = original == padding_value
        assert padding.any(), "the test slice has no padding pixels"
        assert np.array_equal(stored[padding], original[padding]), f"{output}: padding pixels changed"
        assert float(ds.RescaleSlope) == float(source.RescaleSlope)
        assert float(ds.RescaleIntercept) == float(source.RescaleIntercept)
        assert ds.get("RescaleType") == source.get("RescaleType")
        assert (int(ds.BitsStored), int(ds.PixelRepresentation)) == \
            (int(source.BitsStored), int(source.PixelRepresentation))
        bits = int(ds.BitsStored)
        lo, hi = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if int(ds.PixelRepresentation) == 1
                  else (0, (1 << bits) - 1))
        assert lo <= int(stored.min()) and int(stored.max()) <= hi
        assert "blend 0 " in str(ds.DerivationDescription)
        changed += int(np.count_nonzero(stored[~padding] != original[~padding]))
    assert changed, "the model left every anatomy pixel unchanged: it did not run"


@pytest.mark.parametrize("image", ["CT1", "CT2"])
@pytest.mark.parametrize("syntax", ["RLE", "JPLL", "JLSL", "J2KR"])
def test_lossless_wg04_files_decode_bit_exact(shared_ct, image, syntax):
    """The installed decoders (RLE, GDCM for JPEG Lossless, CharLS, OpenJPEG) give back exactly
    the uncompressed original's pixels, through the project's own reader."""
    from ldct_cli.dicom.read import load_slice

    folder = shared_ct / "wg04_transfer_syntaxes"
    _, original = load_slice(folder / f"{image}_UNC")
    _, decoded = load_slice(folder / f"{image}_{syntax}")
    assert np.array_equal(decoded.astype(np.int64), original.astype(np.int64))
