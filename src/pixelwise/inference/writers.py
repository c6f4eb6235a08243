"""``pixelwise predict``: image files in, masks, overlays and instance files out.

Per input ``<stem>``:

- ``<stem>.png``: palette-indexed class mask (the class id is the pixel value), the input's size,
  holding in a text chunk the record of what made it (:func:`prediction_record`; ``resume``);
- ``<stem>_overlay.png``: the mask blended over the image;
- ``<stem>_uncertainty.png`` (semantic, with ``uncertainty``): predictive entropy, 255 = maximal;
- ``<stem>_cells.png`` (two-class boundary models, with ``watershed``): 16-bit watershed cell ids,
  whose one-pixel boundaries are then drawn into ``<stem>.png`` as class 0 (:func:`write_cells`);
- instance models: the class mask takes the class of the highest-scoring instance covering each
  pixel, ``<stem>_instances.png`` is a 16-bit instance-id map (0 = none, k = k-th detection of the
  JSON), the overlay shows instances with boxes, class names and scores, and ``<stem>.json`` holds
  ``{"width", "height", "instances": [{"id", "label", "class_name", "score", "box" (x1, y1, x2, y2),
  "area", "segmentation" (COCO RLE, counts as a string)}]}``.

Never over an input, never one output over another (:func:`check_predict`, before anything is
written): an ``--out`` folder that holds any input is refused; inputs whose stems collide (``c.png``
and ``c.jpg``, or ``x.png`` in two folders) are named ``<stem>_<ext>`` (``c_png``, ``c_jpg``), and a
name still taken, by an earlier input or by another input's outputs, gets ``_2``, ``_3``, ... in input
order. A file of several frames (a TIFF stack such as the ISBI challenge's ``test-volume.tif``, an
animated GIF or WebP) gives one prediction per frame, ``<stem>_<k>`` with ``k`` counted from 0 and
zero-padded to one width of at least two digits (``test-volume_00`` ... ``test-volume_29``, the
names the ``isbi2012`` reader gives the slices of a stack). Every input is decoded
first, every frame of it: unreadable ones are all named in one error and nothing is written, or,
with ``skip_invalid``, left out and listed.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import unicodedata
from collections.abc import Generator, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pixelwise._version import __version__
from pixelwise.checkpoint import NameTaken, file_version, place, remove_stale_temporaries, temporary_paths
from pixelwise.coco_eval import encode_mask
from pixelwise.data.download import file_sha256
from pixelwise.data.io import (
    IMAGE_SUFFIXES,
    PngRowWriter,
    format_names,
    png_text,
    probe_info,
    read_frames,
    read_image,
    write_mask,
)
from pixelwise.data.palette import clear_class, default_palette, overlay
from pixelwise.errors import UserError, brief
from pixelwise.inference.cells import cell_map, check_seed_threshold, watershed_cells
from pixelwise.inference.crf import CRFSettings, check_crf_size
from pixelwise.inference.evaluate import RECORD_KEY, crf_settings, parse_record, prediction_options
from pixelwise.inference.predictor import InstancePredictor, Predictor, SemanticPredictor, check_flags
from pixelwise.runtime import check_can_create
from pixelwise.runtime import progress as progress_bar

STRIP_ROWS = 64  # image rows per step when writing an overlay or uncertainty map (bounds their temporaries)
MaskRow = tuple[int, np.ndarray, np.ndarray | None]  # (y, mask uint8[n, W], entropy float32[n, W] | None)


def _listed(p: Path) -> bool:
    """Whether a folder's or a pattern's entry ``p`` is an input: an image file by its suffix
    (:data:`pixelwise.data.io.IMAGE_SUFFIXES`, the list folder datasets use), or a broken link with such a
    name (then reported as one, not passed over); a hidden file (``.name``) is not, in a folder as
    in a glob pattern."""
    return (p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            and (p.is_file() or (p.is_symlink() and not p.exists())))


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders expand to the image files inside them (sorted, not recursively, hidden
    files left out), and so do glob patterns (``'photos/*.jpg'``, quoted so that pixelwise rather
    than the shell expands them; ``**`` spans folders: ``'photos/**/*.jpg'``).

    A file reached twice under one name (its folder and itself, or a folder and a link to that
    folder) is predicted once; a link and its target with different names (``link.png ->
    rgb.png``) are two inputs, and each gets its outputs under its own name."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if _listed(q))
        elif p.is_file() or p.is_symlink() or p.exists():  # a broken link or a FIFO is named when it is read
            paths.append(p)
        elif _magic(item):
            matches = sorted(Path(q) for q in glob.glob(item, recursive=True) if _listed(Path(q)))
            if not matches:
                raise UserError(f"no images match {item}")
            paths += matches
        else:
            raise UserError(f"input {p} not found; check the path (a glob in quotes, 'photos/*.jpg', is expanded "
                            "by predict)")
    if not paths:
        nested = [item for item in inputs if Path(item).is_dir()
                  and any(_listed(q) for sub in Path(item).iterdir() if sub.is_dir() for q in sub.iterdir())]
        hint = (f"; {nested[0]} holds none directly but its subfolders do (as Cityscapes' leftImg8bit/val/<city>/): "
                f"give the quoted pattern '{Path(nested[0]) / '*' / '*'}'" if nested else "")
        raise UserError(f"no images found in {', '.join(inputs)} (the image files read from a folder are "
                        f"{format_names()}, by their suffix, not those of its subfolders){hint}")

    def key(p: Path) -> tuple[Path, str]:
        return _resolved(p), p.name

    unique = {key(p): p for p in reversed(paths)}
    return [p for p in paths if unique[key(p)] is p]


def _magic(text: str) -> bool:
    """Whether ``text`` holds a glob wildcard (``*``, ``?`` or ``[``)."""
    return any(ch in text for ch in "*?[")


def pattern_reaches(pattern: str, path: Path) -> bool:
    """Whether ``glob.glob(pattern, recursive=True)`` would list ``path`` were it there: each
    component matched as glob matches it (``**`` any number of folders, wildcards not matching a
    hidden name unless the pattern's component starts with a dot), both made absolute; and, as glob
    walks the folders the links lead to, again with the links of ``path``'s folder and of the
    pattern's fixed leading folders followed (``--out lnk/pred``, ``lnk`` a link into the tree the
    pattern reads)."""
    want = Path(os.path.abspath(os.path.expanduser(pattern))).parts
    have = Path(os.path.abspath(path)).parts
    fixed = next((i for i, part in enumerate(want) if _magic(part)), len(want))
    want_real = _resolved(Path(*want[:fixed])).parts + want[fixed:] if fixed else want
    have_real = (_resolved(Path(*have[:-1])) / have[-1]).parts if len(have) > 1 else have
    return any(_reaches(w, h) for w, h in {(want, have), (want_real, have_real)})


def _reaches(want: tuple[str, ...], have: tuple[str, ...]) -> bool:
    """:func:`pattern_reaches` for absolute parts, as they are."""

    def match(i: int, j: int) -> bool:
        if i == len(want):
            return j == len(have)
        if want[i] == "**":
            return match(i + 1, j) or (j < len(have) and not have[j].startswith(".") and match(i, j + 1))
        if j == len(have):
            return False
        if not _magic(want[i]):
            same = os.path.normcase(want[i]) == os.path.normcase(have[j])
        else:
            same = fnmatch.fnmatch(have[j], want[i]) and (want[i].startswith(".") or not have[j].startswith("."))
        return same and match(i + 1, j + 1)

    return match(0, 0)


def _resolved(p: Path) -> Path:
    """``p`` with its links followed; a link loop (an error of ``resolve``: RuntimeError before Python
    3.13) stays as it is, to be named when it is read."""
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return p.absolute()


def _name_length(name: str) -> int:
    """A file name's length as its file system counts it against the limit: UTF-16 units on
    Windows (NTFS), bytes elsewhere."""
    return len(name.encode("utf-16-le")) // 2 if os.name == "nt" else len(os.fsencode(name))


def _name_max(folder: Path) -> int:
    """The longest file name (in bytes) the file system of ``folder`` (or its nearest existing
    ancestor) takes; 255 where the system does not say."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no answer
        return 255


def _same_name(name: str) -> str:
    """``name`` as a case- and normalisation-insensitive file system sees it."""
    return unicodedata.normalize("NFC", name).casefold()


def output_names(stem: str, instance: bool = False, uncertainty: bool = False, cells: bool = False) -> list[str]:
    """The files written for one input named ``stem`` (the writers below)."""
    if instance:
        return [f"{stem}.png", f"{stem}_instances.png", f"{stem}_overlay.png", f"{stem}.json"]
    return ([f"{stem}.png", f"{stem}_overlay.png"] + ([f"{stem}_uncertainty.png"] if uncertainty else [])
            + ([f"{stem}_cells.png"] if cells else []))


def unique_stems(paths: list[Path], instance: bool = False, uncertainty: bool = False,
                 frames: list[tuple[int, int]] | None = None, cells: bool = False) -> list[str]:
    """One output stem per input, so that no two inputs write the same file (module docstring):
    ``<stem>``, or ``<stem>_<ext>`` where stems collide, then ``_2``, ``_3``, ... while a name is taken.
    Names are compared as file systems may compare them: without case (``A.png`` and ``a.png`` are
    one file on macOS and Windows) and Unicode normalisation (``café`` typed on a Mac, NFD, and
    copied from Linux, NFC, are one file on APFS).
    ``frames[i] = (k, n)``: ``paths[i]`` stands for frame ``k`` of its ``n``, named ``<stem>_<k>``
    (``k`` zero-padded to the width of ``n - 1``, at least 2) when ``n > 1`` (a file of several
    frames is listed once per frame)."""
    frames = frames or [(0, 1)] * len(paths)
    counts: dict[str, int] = {}
    for p in dict.fromkeys(paths):  # each file once, however many frames it has
        counts[_same_name(p.stem)] = counts.get(_same_name(p.stem), 0) + 1
    taken: set[str] = set()
    stems = []
    for p, (frame, count) in zip(paths, frames, strict=True):
        base = p.stem if counts[_same_name(p.stem)] == 1 else f"{p.stem}_{p.suffix[1:].lower()}"
        if count > 1:
            base = f"{base}_{frame:0{max(2, len(str(count - 1)))}d}"  # as the isbi2012 reader names slices
        stem, k = base, 2
        while any(_same_name(n) in taken for n in output_names(stem, instance, uncertainty, cells)):
            stem, k = f"{base}_{k}", k + 1
        taken |= {_same_name(n) for n in output_names(stem, instance, uncertainty, cells)}
        stems.append(stem)
    return stems


def source_sha256(predictor: Predictor) -> str:
    """SHA-256 of the file ``predictor`` was loaded from, a UserError when that file was written over
    since (its weights are not the new file's: ``--resume`` would keep their masks as the new model's)."""
    assert predictor.source is not None
    digest = file_sha256(predictor.source)
    if predictor.source_version is not None and file_version(predictor.source) != predictor.source_version:
        raise UserError(f"{predictor.source} was replaced after it was loaded (a training run or a copy writing it?), "
                        "so the predictions would be recorded as the new file's; run the command again (in Python: "
                        "load it again, Predictor.from_checkpoint)")
    return digest


def source_files(predictor: Predictor) -> list[dict | None]:
    """The file of each model of ``predictor`` (an ensemble's members in order): ``{"file": name,
    "sha256": ...}`` of the file it was loaded from, None for one built from a model in memory; a
    UserError for a file written over since it was loaded (:func:`source_sha256`)."""
    return [{"file": m.source.name, "sha256": source_sha256(m)} if m.source else None
            for m in getattr(predictor, "members", [predictor])]


def prediction_record(predictor: Predictor, *, uncertainty: bool = False, watershed: float | None = None) -> dict:
    """What makes a prediction, written into each ``<stem>.png`` as JSON (the PNG text chunk
    ``pixelwise``): every model's file (name and SHA-256; None for a predictor built from a model in
    memory), input contract and options (resize, mode, tile, overlap, TTA, Monte-Carlo samples), the
    CRF's settings, the instance score threshold, ``uncertainty``, ``watershed`` and the pixelwise
    version; :func:`check_predict` adds each frame's ``image`` (its input file's SHA-256 and the frame)
    to the record its mask holds. ``predict --resume`` keeps an earlier run's outputs only where
    their record is this one (:func:`record_difference`). The device and the batch size are not part
    of it: they change nothing but float rounding."""
    members = getattr(predictor, "members", [predictor])
    record = {"pixelwise_version": __version__, "models": source_files(predictor),
              "input": [m.input_spec.to_dict() for m in members],
              "prediction": [prediction_options(m) for m in members],
              "crf": crf_settings(predictor), "score_thresh": getattr(predictor, "score_thresh", None),
              "uncertainty": uncertainty, "watershed": watershed}
    return json.loads(json.dumps(record))  # as it reads back from a file: lists, not tuples


def _sha256s(record: dict) -> list:
    return [m.get("sha256") if isinstance(m, dict) else None for m in record.get("models") or []]


def record_difference(found: str | None, wanted: dict) -> str | None:
    """None where the record text read from a mask (:func:`png_text`) is the ``wanted``
    :func:`prediction_record`, the version and the model files' names aside (a renamed checkpoint
    is the same model, and a new version predicts as the old one did); else what differs, in words."""
    record = parse_record(found)
    if record is None:
        return "it holds no record of a pixelwise prediction (a file of yours, or one written before records)"
    models, models_now = _sha256s(record), _sha256s(wanted)
    if models != models_now:
        return (f"it was predicted by another model (SHA-256 {', '.join(str(h)[:12] for h in models) or 'none'}; "
                f"now {', '.join(str(h)[:12] for h in models_now)})")
    image, image_now = record.get("image"), wanted.get("image")
    if image != image_now and isinstance(image_now, dict):
        then_sha = image.get("sha256") if isinstance(image, dict) else None
        return (f"it was predicted from another image (SHA-256 {str(then_sha)[:12]}, now {image_now['sha256'][:12]}: "
                "the input changed since, or it is another folder's image of that name)")
    for key, what in RECORDED.items():
        then: Any = record.get(key)
        now: Any = wanted.get(key)
        if then == now:
            continue
        if isinstance(then, list) and isinstance(now, list) and len(then) == len(now):  # one entry per model
            pairs = [(a, b) for a, b in zip(then, now) if a != b]
            then, now = pairs[0]
            if isinstance(then, dict) and isinstance(now, dict):  # name the settings that differ
                keys = [k for k in {**then, **now} if then.get(k) != now.get(k)]
                then, now = ({k: d.get(k) for k in keys} for d in (then, now))
        return f"{what} {json.dumps(then)[:200]} there, {json.dumps(now)[:200]} now"
    return None


# what the record holds beside the models, and how a difference is named
RECORDED = {"image": "input image", "input": "input contract", "prediction": "prediction options",
            "crf": "CRF settings", "score_thresh": "score threshold", "uncertainty": "uncertainty",
            "watershed": "watershed"}


@dataclass
class PredictPlan:
    """What ``predict`` will do, settled before the first write: frame ``frames[i]`` of ``paths[i]``
    -> ``out/stems[i]...`` (a file of several frames is listed once per frame); ``skipped``: one
    reason per unreadable input left out (``skip_invalid``, which also leaves out an input that
    cannot be read any more when its turn comes). ``records``: each stem's :func:`prediction_record`
    with its image, written into its mask; ``kept``: the frames an earlier run with those records
    predicted, left out (``resume``); ``replaceable``: the output names such a run left incomplete
    (interrupted between its renames)."""

    paths: list[Path]
    frames: list[int]
    stems: list[str]
    out: Path
    skipped: list[str] = field(default_factory=list)
    skip_invalid: bool = False
    overwrite: bool = False  # files at the outputs' names may be replaced
    records: dict[str, dict] = field(default_factory=dict)
    kept: int = 0
    replaceable: frozenset[str] = frozenset()


def _reason(err: UserError) -> str:
    return str(err).removesuffix("; re-export it or remove it")


def check_predict(inputs: list[str], out: str | Path, *, instance: bool = False, uncertainty: bool = False,
                  skip_invalid: bool = False, progress: bool | None = None, cells: bool = False,
                  overwrite: bool = False, crf: CRFSettings | None = None, record: dict | None = None,
                  resume: bool = False) -> PredictPlan:
    """Every check of ``predict``, before anything is written: the inputs exist and decode (and
    with ``crf``, the predictor's CRF settings, every frame is within the CRF's size and lattice),
    ``out`` is a folder that holds none of them and no output lands on an input (through a link
    either), nor, unless ``overwrite``, on a file already there (an earlier prediction, or a file of
    the user's that has an output's name).
    Unreadable inputs are all named in one UserError, or left out and listed with ``skip_invalid``.

    ``resume`` (an interrupted run, again): the frames whose outputs are all there, with a mask whose
    record is ``record`` (:func:`prediction_record`), are left out and counted in ``kept``; a frame whose
    mask has that record but whose other outputs are not all there is predicted again over them.
    Any other file at an output's name is refused as without ``resume``."""
    if resume and overwrite:
        raise UserError("--resume keeps the outputs an interrupted predict wrote and --overwrite replaces them: "
                        "give one of the two")
    if resume and (record is None or None in record["models"]):
        raise UserError("resume needs the record of models loaded from files (Predictor.from_checkpoint), to "
                        "tell that the outputs there are theirs")
    paths = expand_inputs(inputs)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; give a folder for the predictions")
    check_can_create(out_dir, f"--out {out_dir}")  # a read-only folder: said now, not by a temporary file's name
    patterns = [item for item in inputs if not Path(item).exists() and _magic(item)]
    inside = [p for p in paths if _resolved(p).parent == out_dir.resolve()]
    if inside:
        here = out_dir.resolve()  # a folder a pattern of the inputs does not reach, to suggest
        free = next((c for c in (out_dir / "predictions", here.parent / f"{here.name}-predictions")
                     if not any(pattern_reaches(item, c / "mask.png") for item in patterns)), None)
        raise UserError(f"--out {out_dir} holds the input {inside[0]}"
                        f"{f' and {len(inside) - 1} more' if len(inside) > 1 else ''}, and predictions never go "
                        "beside their inputs; give another folder" + (f", e.g. --out {free}" if free else ""))
    readable, counts, skipped, digests = [], [], [], []
    for p in progress_bar(paths, "check inputs", show=progress):
        try:
            probe_info(p)  # the header checks every verb makes: a file cut short is refused here as by eval
            count = 0
            for frame in read_frames(p):  # decodes every frame, in one pass over the file
                count += 1
                if crf:
                    check_crf_size(frame.shape[0], frame.shape[1], str(p), crf)
        except UserError as e:
            skipped.append(_reason(e))
            continue
        readable.append(p)
        counts.append(count)
        digests.append(file_sha256(p) if record is not None else None)
    if skipped and not skip_invalid:
        raise UserError(f"{len(skipped)} of {len(paths)} input(s) cannot be read, nothing was written: "
                        f"{'; '.join(skipped)}; fix or remove them, or pass --skip-invalid to predict the rest")
    if not readable:
        raise UserError(f"none of the {len(paths)} input(s) can be read: {'; '.join(skipped)}")
    items = [(p, frame, count) for p, count in zip(readable, counts) for frame in range(count)]
    # each mask's record names its image too: an input changed since (or another folder's image of
    # the same name) is not taken for the one its mask was predicted from
    item_records = [None if record is None else {**record, "image": {"sha256": digest, "frame": frame}}
                    for digest, count in zip(digests, counts) for frame in range(count)]
    stems = unique_stems([p for p, _, _ in items], instance, uncertainty, [(k, n) for _, k, n in items], cells)
    inodes = {(s.st_dev, s.st_ino) for s in map(os.stat, readable)}
    longest = _name_max(out_dir)
    taken: list[Path] = []  # files at output names that resume does not take as an earlier run's
    why: str | None = None  # ... why the first of them is not
    resumable = 0  # frames there that an earlier run of this record predicted
    done: set[int] = set()  # frames whose outputs such a run wrote, all of them (resume)
    replaceable: set[str] = set()  # the outputs present of frames such a run left incomplete (resume)
    for i, ((path, _, _), stem) in enumerate(zip(items, stems)):
        names = output_names(stem, instance, uncertainty, cells)
        present = []
        for name in names:
            if _name_length(name) > longest:
                raise UserError(f"{path}: its output {name} would be longer than the {longest} bytes a file name "
                                "may have; rename the input to a shorter name")
            target = out_dir / name
            pattern = next((item for item in patterns if pattern_reaches(item, target)), None)
            if pattern is not None:
                raise UserError(f"--out {out_dir} is where the pattern {pattern!r} reads: the output {name} would be "
                                "read as an input by the next run of this command; give a folder that the pattern "
                                "does not reach")
            if target.exists() and (os.stat(target).st_dev, os.stat(target).st_ino) in inodes:
                raise UserError(f"{target} is a link to one of the inputs and would be written over; remove it "
                                "or give another --out")
            if target.exists() or target.is_symlink():
                present.append(target)
        if not present:
            continue
        # a frame's mask is renamed into place first: where it is there and holds the record, the
        # frame's other outputs there are that run's too
        if present[0].name != names[0]:
            differs: str | None = f"its mask {names[0]}, which holds the record, is not there"
        else:
            wanted = item_records[i]
            differs = "" if wanted is None else record_difference(png_text(present[0], RECORD_KEY), wanted)
        resumable += differs is None
        if resume and differs is None:
            if len(present) == len(names):
                done.add(i)
            else:
                replaceable.update(names)
            continue
        if not taken:
            why = differs
        taken += present
    if taken and not overwrite:
        more = f" and {len(taken) - 1} more of this prediction's output names" if len(taken) > 1 else ""
        if resume:
            others = f" (and {len(taken) - 1} more output names there)" if len(taken) > 1 else ""
            raise UserError(f"--resume: {taken[0]}{others} is not known to be this prediction's (its image, model "
                            f"and options): {why}; pass --overwrite instead to replace such files, or give another "
                            "--out")
        hint = (f"; {resumable} of these inputs were predicted there with this model and these options (an "
                "interrupted run?): pass --resume to keep them and predict the rest") if resumable else ""
        raise UserError(f"--out {out_dir} already holds {taken[0].name}{more} (an earlier prediction, or a file of "
                        f"yours); pass --overwrite to replace them, or give another --out{hint}")
    todo = [i for i in range(len(items)) if i not in done]
    return PredictPlan([items[i][0] for i in todo], [items[i][1] for i in todo], [stems[i] for i in todo], out_dir,
                       skipped, skip_invalid, overwrite,
                       {stems[i]: r for i in todo if (r := item_records[i]) is not None}, len(done),
                       frozenset(replaceable))


# whether staged() may replace files already at its names, or which names it may: predict_files sets
# it from --overwrite, and --resume's names of frames an interrupted run left incomplete
_REPLACE: ContextVar[bool | frozenset[str]] = ContextVar("pixelwise_replace_outputs", default=True)


@contextmanager
def staged(out_dir: Path, names: list[str]) -> Iterator[dict[str, Path]]:
    """Temporary paths in ``out_dir`` for the output files ``names`` (each keeps its suffix, so PIL
    knows the format). When the block ends without an error they are renamed to their names, which
    replaces an earlier file (or a link: never the file it points to) only by a complete one; on an
    error, Ctrl-C or SIGTERM they are removed. So a name holds the old file or the whole new one,
    never a truncated PNG. Inside :func:`predict_files` without ``overwrite`` a name that another
    process wrote since the check is left as it is (:func:`pixelwise.checkpoint.place`)."""
    replace = _REPLACE.get()
    paths = dict(zip(names, temporary_paths(out_dir, [Path(name).suffix for name in names])))
    try:
        yield paths
        for name, path in paths.items():
            place(path, out_dir / name, replace if isinstance(replace, bool) else name in replace)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a write to an open file (a full disk) names none
            raise OSError(e.errno, e.strerror, str(out_dir / names[0])) from e
        raise
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)


def entropy_to_gray(entropy: np.ndarray, num_classes: int) -> np.ndarray:
    """Predictive entropy float[H, W] -> uint8[H, W], 255 = the largest possible entropy (``log C``):
    the pixels of ``<stem>_uncertainty.png`` (and of serve's uncertainty map)."""
    scale = np.log(max(num_classes, 2))
    return np.rint(entropy / scale * 255).clip(0, 255).astype(np.uint8)  # the nearest level


def write_semantic(out_dir: Path, stem: str, image: np.ndarray, rows: Iterable[MaskRow], palette: list,
                   class_names: Sequence[str], uncertainty: bool = False, record: dict | None = None) -> Path:
    """The mask, the overlay and (with ``uncertainty``) the uncertainty map of one image, written
    as its row bands come (``(y, mask, entropy)`` top to bottom, as
    :meth:`~pixelwise.inference.predictor.SemanticPredictor.predict_rows` gives them): no file's
    pixels are held whole, and the overlay's float temporaries cover ``STRIP_ROWS`` rows. The mask
    holds ``record`` (:func:`prediction_record`)."""
    h, w = image.shape[:2]
    num_classes, clear = len(class_names), clear_class(class_names)
    names = output_names(stem, uncertainty=uncertainty)
    with staged(out_dir, names) as paths, ExitStack() as files:  # the files close before the renames

        def png(suffix: str, mode: str, text: dict[str, str] | None = None) -> PngRowWriter:
            path = paths[f"{stem}{suffix}.png"]
            return files.enter_context(PngRowWriter(files.enter_context(open(path, "wb")), w, h, mode, palette,
                                                    text=text))

        mask_png, overlay_png = png("", "P", _record_text(record)), png("_overlay", "RGB")
        entropy_png = png("_uncertainty", "L") if uncertainty else None
        for y, mask, entropy in rows:
            mask_png.write(mask)
            for s in range(0, len(mask), STRIP_ROWS):
                e = min(s + STRIP_ROWS, len(mask))
                overlay_png.write(overlay(image[y + s : y + e], mask[s:e], palette, clear=clear))
                if entropy_png is not None and entropy is not None:
                    entropy_png.write(entropy_to_gray(entropy[s:e], num_classes))
    return out_dir / f"{stem}.png"


def _record_text(record: dict | None) -> dict[str, str] | None:
    return None if record is None else {RECORD_KEY: json.dumps(record, separators=(",", ":"))}


def check_watershed(predictor: Predictor, watershed: float | None) -> None:
    """``--watershed T`` of ``predict``: a seed threshold in [0, 1) and a two-class semantic model."""
    if watershed is None:
        return
    check_seed_threshold(watershed)
    if not isinstance(predictor, SemanticPredictor) or len(predictor.class_names) != 2:
        raise UserError("--watershed segments cells from a two-class boundary model (class 1 the cells, as "
                        "isbi2012's membrane / cell); this model is not one, so leave it out")


def write_cells(out_dir: Path, stem: str, image: np.ndarray, predictor: SemanticPredictor, threshold: float,
                uncertainty: bool = False, record: dict | None = None) -> Path:
    """A two-class boundary model's prediction with its watershed cells (:mod:`pixelwise.inference.cells`,
    seeded where the class-1 probability exceeds ``threshold``): ``<stem>_cells.png``, 16-bit cell ids
    (0 = no cell, where no seed reached; boundary pixels keep their cell's id), and the usual files,
    whose mask has the one-pixel boundaries between cells drawn in as class 0 (the map
    ``pixelwise eval --watershed`` scores, at the argmax). The image is predicted whole (tiles
    included), not streamed: the watershed needs the whole map."""
    prediction = predictor.predict(image, uncertainty=uncertainty)
    assert prediction.probs is not None
    labels = watershed_cells(prediction.probs[1].numpy(), threshold)
    if labels.max() > np.iinfo(np.uint16).max:
        raise UserError(f"{stem}: {labels.max()} cells do not fit a 16-bit PNG; predict a smaller image or tiles of it")
    mask = np.where(cell_map(labels), prediction.mask, 0).astype(np.uint8)
    with staged(out_dir, [f"{stem}_cells.png"]) as paths:  # named only once the other files are written
        Image.fromarray(labels.astype(np.uint16)).save(paths[f"{stem}_cells.png"])
        return write_semantic(out_dir, stem, image, [(0, mask, prediction.uncertainty)], predictor.palette,
                              predictor.class_names, uncertainty, record)


def instance_maps(masks: np.ndarray, labels: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """bool[D, H, W] masks (sorted by decreasing score) -> (class mask uint8[H, W], ids uint16[H, W]);
    where instances overlap, the higher-scoring one wins."""
    classes = np.zeros(shape, np.uint8)
    ids = np.zeros(shape, np.uint16)
    for k in range(len(masks) - 1, -1, -1):  # paint low scores first
        classes[masks[k]] = labels[k]
        ids[masks[k]] = k + 1
    return classes, ids


def instance_colors(count: int) -> list[tuple[int, int, int]]:
    """The overlay colour of each of ``count`` instances (by decreasing score): one colour per
    instance, so that touching objects of one class stay apart."""
    return default_palette(count + 8)[8:]  # skip the darkest entries


def draw_instances(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
                   scores: np.ndarray, class_names: list[str], alpha: float = 0.45) -> Image.Image:
    colours = instance_colors(len(masks))
    out = image.astype(np.float32)
    for k in range(len(masks) - 1, -1, -1):
        out[masks[k]] = out[masks[k]] * (1 - alpha) + np.array(colours[k], np.float32) * alpha
    img = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for k, (box, label, score) in enumerate(zip(boxes, labels, scores)):
        name = class_names[label] if label < len(class_names) else str(label)
        draw.rectangle([float(v) for v in box], outline=tuple(colours[k]), width=2)
        draw.text((float(box[0]) + 2, float(box[1]) + 1), f"{name} {score:.2f}", fill=(255, 255, 255))
    return img


def _float32(value: float) -> float:
    """A float32 in the fewest digits that read back as the same float32 (numpy's shortest form):
    ``eval --predictions`` ranks the detections of ``<stem>.json`` as eval ranks the model's."""
    return float(str(np.float32(value)))


def instances_json(det: dict, image_shape: tuple[int, ...], class_names: list[str],
                   category_ids: Sequence[int] | None = None) -> dict:
    """Detections (``InstancePredictor.predict``) -> the ``<stem>.json`` document; with the
    checkpoint's ``category_ids`` (a model trained on COCO data), each instance also gets
    ``category_id``, the dataset's own id of its class, which COCO results files use."""
    masks = det["masks"].numpy()
    boxes, labels, scores = det["boxes"].numpy(), det["labels"].numpy(), det["scores"].numpy()
    instances = []
    for k in range(len(masks)):
        rle = encode_mask(masks[k])
        label = int(labels[k])
        instances.append({"id": k + 1, "label": label,
                          "class_name": class_names[label] if label < len(class_names) else str(label),
                          **({"category_id": int(category_ids[label])} if category_ids else {}),
                          "score": _float32(scores[k]), "box": [_float32(v) for v in boxes[k]],
                          "area": int(masks[k].sum()),
                          "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}})
    return {"width": int(image_shape[1]), "height": int(image_shape[0]), "instances": instances}


def write_instances(out_dir: Path, stem: str, image: np.ndarray, det: dict, class_names: list[str],
                    palette: list, category_ids: Sequence[int] | None = None, record: dict | None = None) -> Path:
    masks, labels = det["masks"].numpy(), det["labels"].numpy()
    classes, ids = instance_maps(masks, labels, image.shape[:2])
    with staged(out_dir, output_names(stem, instance=True)) as paths:
        write_mask(paths[f"{stem}.png"], classes, palette, _record_text(record))
        Image.fromarray(ids).save(paths[f"{stem}_instances.png"])
        draw_instances(image, masks, det["boxes"].numpy(), labels, det["scores"].numpy(), class_names).save(
            paths[f"{stem}_overlay.png"])
        paths[f"{stem}.json"].write_text(json.dumps(instances_json(det, image.shape, class_names, category_ids)))
    return out_dir / f"{stem}.png"


def plan_images(plan: PredictPlan) -> Iterator[tuple[str, np.ndarray]]:
    """``(stem, image)`` of the plan's frames in its order. The frames of a multi-frame file, listed
    one after another from frame 0 as :func:`check_predict` lists them, are read in one pass over
    the file (:func:`~pixelwise.data.io.read_frames`); any other frame is read on its own.

    An input that cannot be read any more (removed or changed since the check) is left out and
    added to ``plan.skipped`` with ``plan.skip_invalid``; else a UserError says what was written."""
    frames: Generator[np.ndarray, None, None] | None = None
    previous: tuple[Path, int] | None = None
    lost: set[Path] = set()
    for i, (path, frame, stem) in enumerate(zip(plan.paths, plan.frames, plan.stems)):
        if path in lost:
            continue
        try:
            if frame == 0 or previous != (path, frame - 1):
                if frames is not None:
                    frames.close()
                frames = read_frames(path) if frame == 0 else None
            image = next(frames, None) if frames is not None else None
            if image is None:  # not read in order, or the file has lost frames since the check: its own error
                image = read_image(path, frame)
        except UserError as e:
            frames, previous = None, None
            if not plan.skip_invalid:
                raise UserError(f"{_reason(e)} (it changed after the inputs were checked); {i} of the "
                                f"{len(plan.paths)} predictions were written to {plan.out}, the rest were not made: "
                                "predict them with --resume, or pass --skip-invalid to go past such inputs") from None
            lost.add(path)
            plan.skipped.append(f"{_reason(e)} (it changed after the inputs were checked)")
            continue
        previous = (path, frame)
        yield stem, image
    if frames is not None:
        frames.close()


def predict_files(predictor: Predictor, inputs: list[str] | PredictPlan, out: str | Path | None = None, *,
                  uncertainty: bool = False, progress: bool | None = None,
                  watershed: float | None = None, overwrite: bool = False, resume: bool = False) -> list[Path]:
    """Predict every image of ``inputs`` (files, folders or glob patterns, checked here, or the plan
    of :func:`check_predict`; every frame of a multi-frame file) into ``out``; -> the mask paths.
    Semantic models run one image at a time, large ones in streamed tiles (with a bar over the
    tiles), whose rows are written as the tiles finish. Images are not stacked with each other:
    a stacked batch runs other kernels, whose float32 rounding can flip a pixel whose two best
    classes nearly tie, and each mask must be the one ``eval`` scores and ``serve`` returns.
    ``watershed``: a two-class boundary model's cells, seeded where the class-1 probability
    exceeds it (:func:`write_cells`). Files of the outputs' names already in ``out`` are refused
    (a UserError before any work) unless ``overwrite``, or, with ``resume``, where an earlier run
    with this model and these options wrote them (:func:`check_predict`). Each mask holds the
    :func:`prediction_record`.

    Ctrl-C or SIGTERM: the predictions written stay, whole, and the ``KeyboardInterrupt`` raised
    says how many (its first argument), and that ``resume`` predicts the rest."""
    if not isinstance(predictor, Predictor):  # a path gave "'str' object has no attribute 'source'"
        raise TypeError(f"predict_files: predictor must be a Predictor (Predictor.from_checkpoint(path)), "
                        f"got {type(predictor).__name__} {brief(predictor)}")
    check_flags(uncertainty=uncertainty, overwrite=overwrite, resume=resume)
    if isinstance(inputs, str | os.PathLike):  # one file, folder or pattern: a str was read letter by letter
        inputs = [os.fspath(inputs)]
    if isinstance(inputs, PredictPlan):
        plan = inputs
    elif out is None:
        raise TypeError("predict_files: give out, the folder for the predictions")
    else:
        plan = check_predict(inputs, out, instance=isinstance(predictor, InstancePredictor), uncertainty=uncertainty,
                             progress=progress, cells=watershed is not None, overwrite=overwrite,
                             crf=getattr(predictor, "crf", None), resume=resume,
                             record=prediction_record(predictor, uncertainty=uncertainty, watershed=watershed))
    check_watershed(predictor, watershed)
    out_dir = plan.out
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    # a file another process wrote since the check is not replaced
    replacing = _REPLACE.set(plan.overwrite or plan.replaceable)
    try:
        return _write_predictions(predictor, plan, uncertainty, progress, watershed)
    finally:
        _REPLACE.reset(replacing)


def _write_predictions(predictor: Predictor, plan: PredictPlan, uncertainty: bool, progress: bool | None,
                       watershed: float | None) -> list[Path]:
    written: list[Path] = []
    try:
        _write_all(predictor, plan, uncertainty, progress, watershed, written)
    except KeyboardInterrupt as stop:
        said = (f"{len(written)} of the {len(plan.paths)} predictions were written to {plan.out}; the same "
                f"command with --resume{' in place of --overwrite' if plan.overwrite else ''} predicts the rest")
        print(said, flush=True)  # the CLI repeats it on stderr when stdout is not a terminal
        stop.args = (said,)
        raise
    except NameTaken as e:  # the files written so far stay, whole: say which part of the work is done
        raise UserError(f"{e.path} appeared while this command ran (another pixelwise writing in {plan.out}?) and "
                        f"was left as it is; {len(written)} of the {len(plan.paths)} predictions were written, the "
                        "rest were not made: predict into another --out (--overwrite would replace the other "
                        "command's files)") from None
    return written


def _write_all(predictor: Predictor, plan: PredictPlan, uncertainty: bool, progress: bool | None,
               watershed: float | None, written: list[Path]) -> None:
    out_dir = plan.out
    record_of = plan.records.get  # the stem's record, with its image's SHA-256 (check_predict)
    # closed also on Ctrl-C or an error, before the one line that says so (a bar closed later by the
    # garbage collector was drawn again under it)
    with progress_bar(plan.paths, "predict", show=progress) as bar:
        if isinstance(predictor, SemanticPredictor) and watershed is not None:
            for stem, image in plan_images(plan):
                written.append(write_cells(out_dir, stem, image, predictor, watershed, uncertainty, record_of(stem)))
                bar.update()
        elif isinstance(predictor, SemanticPredictor):
            for stem, image in plan_images(plan):  # one image at a time: the masks eval scores, bit for bit
                rows = predictor.predict_rows([image], uncertainty=uncertainty, progress=progress)[0]
                try:
                    written.append(write_semantic(out_dir, stem, image, rows, predictor.palette,
                                                  predictor.class_names, uncertainty, record_of(stem)))
                finally:  # its tile bar, if any, closes with the generator, before an error is said
                    getattr(rows, "close", lambda: None)()
                bar.update()
        else:
            assert isinstance(predictor, InstancePredictor)
            for stem, image in plan_images(plan):
                det = predictor.predict(image)
                written.append(write_instances(out_dir, stem, image, det, predictor.class_names, predictor.palette,
                                               predictor.meta.get("category_ids"), record_of(stem)))
                bar.update()
