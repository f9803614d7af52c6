"""Seeded fuzzing of ``ldct denoise`` (issue 19): about a hundred damaged files, made here from
clean synthetic series, must each give one line naming the file, never a traceback or a
pydicom warning; the clean series are written; the exit code is 0, 1 or 2; ``--json`` is
valid JSON; every input file is written, skipped or failed, exactly once."""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from tests.synth import SeriesSpec, phantom_hu, stored_values, write_series

SEED = 19
N_FUZZED_SERIES = 20
MUTATIONS_PER_SERIES = 5  # of its 6 slices: one stays clean
PATIENT_VALUES = ("Synthetic", "SYN0001", "19700101")  # what no message may repeat

# Elements present in every synthetic slice, with their VR (explicit VR little endian).
HEADER_ELEMENTS = {
    "InstanceNumber": "IS", "SeriesNumber": "IS", "Rows": "US", "Columns": "US", "BitsStored": "US",
    "BitsAllocated": "US", "HighBit": "US", "PixelRepresentation": "US", "SamplesPerPixel": "US",
    "ImagePositionPatient": "DS", "ImageOrientationPatient": "DS", "PixelSpacing": "DS",
    "SliceThickness": "DS", "WindowCenter": "DS", "ImageType": "CS", "SOPInstanceUID": "UI",
    "StudyInstanceUID": "UI", "FrameOfReferenceUID": "UI", "AcquisitionNumber": "IS",
    "RescaleSlope": "DS", "RescaleIntercept": "DS", "PhotometricInterpretation": "CS",
    "SeriesDescription": "LO", "XRayTubeCurrent": "IS", "PatientName": "PN",
}
BAD_VALUES = ("x1", "-1", "", "1e999", "NaN", "99999999999999", "1\\2\\3", "\u00e9\u00df", "0", "65536")
OTHER_VRS = ("UL", "SQ", "OB", "ZZ", "UN", "US", "FD", "UT")


def _raw_replace(path: Path, keyword: str, value: bytes) -> None:
    """Rewrite one element's value with raw bytes, as a careless writer would."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(path)
    tag = tag_for_keyword(keyword)
    raw = value + (b" " if len(value) % 2 else b"")
    ds[tag] = RawDataElement(pydicom.tag.Tag(tag), ds[tag].VR, len(raw), raw, 0, False, True)
    ds.save_as(path, enforce_file_format=True)


def _element_offset(data: bytes, keyword: str) -> int:
    """Byte offset of ``keyword``'s tag in an explicit VR little endian file."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    needle = (tag >> 16).to_bytes(2, "little") + (tag & 0xFFFF).to_bytes(2, "little")
    needle += HEADER_ELEMENTS[keyword].encode()
    offset = data.find(needle, 132)
    assert offset > 0, keyword
    return offset


def _pixel_offset(data: bytes) -> int:
    return data.rfind(b"\xe0\x7f\x10\x00OW")


def bad_header_value(rng: random.Random, path: Path) -> None:
    _raw_replace(path, rng.choice(sorted(HEADER_ELEMENTS)), rng.choice(BAD_VALUES).encode())


def byte_flip(rng: random.Random, path: Path) -> None:
    data = bytearray(path.read_bytes())
    end = _pixel_offset(bytes(data)) + 8 if rng.random() < 0.8 else len(data)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(132, end)] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))


def truncation(rng: random.Random, path: Path) -> None:
    data = path.read_bytes()
    pixels = _pixel_offset(data)
    cut = rng.choice([rng.randrange(0, pixels), rng.randrange(pixels, pixels + 12),
                      rng.randrange(pixels + 12, len(data))])
    path.write_bytes(data[:cut])


def bad_vr(rng: random.Random, path: Path) -> None:
    data = bytearray(path.read_bytes())
    keyword = rng.choice(sorted(k for k in HEADER_ELEMENTS if k != "PatientName"))
    offset = _element_offset(bytes(data), keyword)
    data[offset + 4:offset + 6] = rng.choice([v for v in OTHER_VRS if v != HEADER_ELEMENTS[keyword]]).encode()
    path.write_bytes(bytes(data))


def non_finite_rescale(rng: random.Random, path: Path) -> None:
    _raw_replace(path, rng.choice(["RescaleSlope", "RescaleIntercept"]),
                 rng.choice(["NaN", "inf", "-inf", "1e400", "-nan"]).encode())


def duplicate(rng: random.Random, path: Path) -> Path:
    """A second file for the slice ``path``: a byte copy, or its pixels and place under a new UID."""
    copy = path.with_name(path.stem + "_copy.dcm")
    if rng.random() < 0.5:
        shutil.copyfile(path, copy)
    else:
        ds = pydicom.dcmread(path)
        uid = generate_uid(entropy_srcs=[path.parent.name, path.name, "copy"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(copy, enforce_file_format=True)
    return copy


def odd_matrix(rng: random.Random, path: Path) -> None:
    ds = pydicom.dcmread(path)
    if rng.random() < 0.5:  # a consistent slice of another size
        rows, columns = rng.choice([(48, 40), (16, 16), (33, 31)])
        spec = SeriesSpec(rows=rows, columns=columns)
        ds.Rows, ds.Columns = rows, columns
        ds.PixelData = stored_values(phantom_hu(rows, columns), spec).astype("<i2").tobytes()
    else:  # a header that does not match its pixel data
        ds.Rows = rng.choice([16, 33, 64, 4096])
    ds.save_as(path, enforce_file_format=True)


MUTATIONS = [bad_header_value, byte_flip, truncation, bad_vr, non_finite_rescale, duplicate, odd_matrix]


def make_fuzzed_tree(root: Path, seed: int = SEED) -> tuple[list[Path], dict[Path, str]]:
    """Clean control series and fuzzed ones under ``root``: (control folders, mutated file -> kind)."""
    import tests.synth as synth

    rng = random.Random(seed)
    counter = iter(range(10**6))
    real_uid = synth.generate_uid  # seeded UIDs: the same bytes, so the same mutations, every run
    synth.generate_uid = lambda: real_uid(entropy_srcs=["fuzz", str(seed), str(next(counter))])
    try:
        return _fuzzed_tree(root, rng)
    finally:
        synth.generate_uid = real_uid


def _fuzzed_tree(root: Path, rng: random.Random) -> tuple[list[Path], dict[Path, str]]:
    controls = []
    for k in range(3):
        write_series(root / f"control_{k}", SeriesSpec(rows=32, columns=32, n_slices=4,
                                                       series_description=f"CONTROL{k}", seed=k))
        controls.append(root / f"control_{k}")
    mutated: dict[Path, str] = {}
    turn = 0
    for k in range(N_FUZZED_SERIES):
        paths = write_series(root / f"fuzz_{k:02d}", SeriesSpec(rows=32, columns=32, n_slices=6,
                                                                series_description=f"FUZZ{k:02d}", seed=k))
        for path in rng.sample(paths, MUTATIONS_PER_SERIES):
            mutation = MUTATIONS[turn % len(MUTATIONS)]
            turn += 1
            made = mutation(rng, path)
            mutated[made or path] = mutation.__name__
    return controls, mutated


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _problem_free(text: str) -> None:
    assert "Traceback" not in text, text
    assert "Warning" not in text and "warn(" not in text, text


def test_fuzzed_files_are_one_line_each_and_the_rest_is_written(tmp_path, cli, capfd):
    src, out = tmp_path / "in", tmp_path / "out"
    controls, mutated = make_fuzzed_tree(src)
    assert len(mutated) == N_FUZZED_SERIES * MUTATIONS_PER_SERIES
    n_inputs = sum(1 for p in src.rglob("*") if p.is_file())
    before = _tree(src)
    args = ("denoise", src, out, "--model", "tv", "--strength", "50", "--quiet")

    with warnings.catch_warnings(record=True) as caught:  # none from this process either
        warnings.simplefilter("always")
        first = cli(*args, "--json")
    assert [str(w.message) for w in caught] == []
    assert first.exit_code in (0, 1, 2)
    assert first.exit_code == 1, first.output
    summary = json.loads(first.stdout)  # valid JSON, nothing else on stdout
    captured = capfd.readouterr()  # what the worker processes printed, too
    for text in (first.stdout, first.stderr, captured.out, captured.err):
        _problem_free(text)

    failed = [f["path"] for f in summary["failed_files"]]
    assert len(failed) == len(set(failed)), "a file is listed twice"
    for entry in summary["failed_files"]:
        assert Path(entry["path"]) in mutated, entry  # only damaged files fail
        assert "\n" not in entry["error"] and entry["error"], entry
        assert not any(value in entry["error"] for value in PATIENT_VALUES), entry
    skipped = [f["path"] for f in summary["skipped_files"]]
    assert all(Path(p) in mutated for p in skipped), summary["skipped_files"]  # duplicates, mostly
    assert sum(mutated[Path(p)] == "duplicate" for p in skipped) >= 10

    by_input = {Path(s["input"]): s for s in summary["series"]}
    for folder in controls:
        assert by_input[folder]["status"] == "done", by_input[folder]
        assert len(list(Path(by_input[folder]["output"]).glob("*.dcm"))) == 4
    written = 0
    for series in summary["series"]:
        assert series["status"] in ("done", "incomplete", "failed"), series
        assert series["error"] is None or "\n" not in series["error"], series
        if series["status"] != "failed":
            files = list(Path(series["output"]).glob("*.dcm"))
            assert len(files) == series["slices"] - len(series["bad_files"]), series
            written += len(files)
    # Every input file was written, skipped or failed, and only once.
    assert written + len(failed) + len(skipped) == n_inputs

    assert _tree(src) == before  # nothing written inside the input tree
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".ldct-partial-") or p.name.endswith(".tmp")]
    assert leftovers == []
    for path in out.rglob("*.dcm"):
        pydicom.dcmread(path)  # every output file is whole

    # A rerun retries the incomplete series and reports each still-bad file once, one line each.
    again = cli(*args)
    assert again.exit_code == 1
    captured = capfd.readouterr()
    for text in (again.stdout, again.stderr, captured.out, captured.err):
        _problem_free(text)
    lines = again.stderr.splitlines()
    for path in failed:
        assert sum(path + ":" in line for line in lines) == 1, path
    for folder in controls:
        assert any(line.startswith(f"skipped series {folder}: already complete") for line in lines)


def test_the_fuzzed_tree_is_the_same_for_a_seed(tmp_path):
    _, a = make_fuzzed_tree(tmp_path / "a")
    _, b = make_fuzzed_tree(tmp_path / "b")
    assert [(p.relative_to(tmp_path / "a"), kind) for p, kind in a.items()] == \
        [(p.relative_to(tmp_path / "b"), kind) for p, kind in b.items()]
    assert sorted(set(a.values())) == sorted(m.__name__ for m in MUTATIONS)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
