"""Run folders: what ``dmquant calibrate`` writes.

A run folder is a saved quantized pipeline (diffusers layout, see :mod:`dmquant.pipeline`) plus
``run.json`` (base model, recipe, calibration summary), ``recipe.yaml`` and ``summary.md``.
Folders and images are written atomically: into a temporary sibling, then renamed. Every folder
dmquant writes carries the marker file :data:`MARKER`; dmquant replaces (``--overwrite``) only such
folders, and never deletes anything else.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from dmquant import __version__
from dmquant.calibration.mixed import draw_plan, plan_markdown
from dmquant.errors import DMQuantError

RUN_FORMAT, RUN_VERSION = "dmquant-run", 1


MARKER = ".dmquant-folder.json"  # every folder dmquant writes carries it; only such folders are ever replaced
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-[^/]*$")


def folder_marker(folder: str | Path) -> dict | None:
    """The marker of a folder dmquant wrote (``{"written_by": "dmquant", "kind": ...}``), else None."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "dmquant" else None


def _stamp(path: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of a file or link as it is now (not followed); None for a folder or nothing."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return None if path.is_dir() and not path.is_symlink() else [st.st_size, st.st_mtime_ns]


def _folder_id(folder: Path) -> list[int]:
    """``[device, inode]`` of the folder itself: a private marker holds the id of the folder dmquant made, so a
    copy of the marker elsewhere (another folder, a copied tree) does not make that folder's files dmquant's."""
    st = folder.lstat()
    return [st.st_dev, st.st_ino]


def _write_marker(folder: Path, kind: str, *, files: list[str] | None = None, stamps: dict | None = None) -> None:
    """The marker: ``private`` (a folder only the dmquant process that made it writes in: everything in it
    is dmquant's) until ``files`` lists what dmquant wrote into the finished folder, each file with its
    size and modification time (``stamps``): a file changed or replaced since then is no longer dmquant's."""
    data = {"written_by": "dmquant", "kind": kind, "dmquant_version": __version__}
    if files is None:
        data.update(private=True, folder_id=_folder_id(folder))
    else:
        if stamps is None:
            stamps = {e: _stamp(folder / e) for e in files}
        data.update(files=files, stamps={e: v for e, v in stamps.items() if v is not None})
    (folder / MARKER).write_text(json.dumps(data, sort_keys=True) + "\n", encoding="utf-8")


def _listing(folder: Path) -> list[str]:
    """Every entry under ``folder`` (relative, POSIX, sorted), the marker left out; links are not followed."""
    entries = [p.relative_to(folder).as_posix() for p in folder.rglob("*")]
    return sorted(e for e in entries if e != MARKER)


def record_written(path: Path) -> None:
    """Add ``path``, a file dmquant has just written into a finished folder of its own, to that folder's
    marker list, so that replacing the folder later deletes it too."""
    path = Path(path).absolute()
    for folder in path.parents:
        marker = folder_marker(folder)
        if marker is not None:
            if isinstance(marker.get("files"), list):
                entry = path.relative_to(folder).as_posix()
                stamps = marker.get("stamps") if isinstance(marker.get("stamps"), dict) else {}
                _write_marker(folder, marker["kind"], files=sorted(set(marker["files"]) | {entry}),
                              stamps={**stamps, entry: _stamp(path)})  # the others keep their first stamps
            return


def make_own_temp_folder(prefix: str) -> str:
    """A new temporary folder (system temp place) carrying the marker, so :func:`remove_own_folder` may delete it."""
    folder = tempfile.mkdtemp(prefix=prefix)
    _write_marker(Path(folder), "temporary")
    return folder


def _written_by_dmquant(path: Path, stamp: list[int] | None, since_ns: int | None) -> bool:
    """Whether the file or link ``path`` is still one dmquant wrote: the same size and modification time as its
    ``stamp`` (a finished folder's list), or, in a private folder, modified since its marker was written
    (``since_ns``: a file brought in with an older time, e.g. copied with its times kept, is not)."""
    now = _stamp(path)
    if now is None:
        return False
    return now == stamp if since_ns is None else now[1] >= since_ns


def _delete_entries(folder: Path, entries: list[str], stamps: dict | None, since_ns: int | None = None) -> None:
    """Delete the listed entries of ``folder`` that dmquant wrote (:func:`_written_by_dmquant`: ``stamps`` of a
    finished folder, or ``since_ns`` for a private one): files and links themselves, then directories left empty
    (deepest first). Anything not listed, not dmquant's, or a listed directory still holding something, stays."""
    root = folder.resolve()
    # a listed entry outside the folder (an absolute name, "..", a link on the way) is never followed
    paths = {e: folder / e for e in entries if not Path(e).is_absolute() and ".." not in Path(e).parts
             and (folder / e).parent.resolve().is_relative_to(root)}
    for entry, path in paths.items():
        if (path.is_symlink() or path.is_file()) and _written_by_dmquant(path, (stamps or {}).get(entry), since_ns):
            path.unlink(missing_ok=True)
    for path in sorted((p for p in paths.values() if p.is_dir() and not p.is_symlink()), key=lambda p: len(p.parts),
                       reverse=True):
        with contextlib.suppress(OSError):
            path.rmdir()


def remove_own_folder(folder: Path) -> bool:
    """Delete what dmquant wrote in ``folder``, then the folder if nothing else is left: the entries its
    marker lists (a finished folder), or everything written since the marker in a private one whose marker names
    this very folder (see :func:`_write_marker`). An unmarked folder is only removed when it is empty (``rmdir``), and a
    marked one without either (written by an older dmquant, or a private marker copied into another
    folder) loses nothing. What stays is named on stderr. The one place where dmquant deletes
    a folder; returns whether the folder is gone."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    marker = folder_marker(folder)
    own_marker = folder / MARKER
    # a private marker that names another folder was copied here: neither it nor anything beside it is dmquant's
    copied = marker is not None and marker.get("private") and marker.get("folder_id") not in (None, _folder_id(folder))
    if marker is not None and marker.get("private") and marker.get("folder_id") == _folder_id(folder):
        _delete_entries(folder, _listing(folder), None, since_ns=own_marker.lstat().st_mtime_ns)
    elif marker is not None and isinstance(marker.get("files"), list):
        stamps = marker.get("stamps")  # an older dmquant's marker has none: then no file is provably its
        _delete_entries(folder, marker["files"], stamps if isinstance(stamps, dict) else {})
    if marker is not None and not copied and not _listing(folder) and own_marker.is_file() \
            and not own_marker.is_symlink():
        own_marker.unlink()
    try:
        folder.rmdir()
        return True
    except OSError:
        print(f"dmquant: note: {folder} holds files dmquant did not write: left in place", file=sys.stderr)
        return False


def _write_error(out: Path, exc: OSError) -> DMQuantError:
    where = f" ({exc.filename})" if exc.filename else ""
    return DMQuantError(f"could not write {out}: {exc.strerror or exc}{where}: free some space or choose "
                        "a writable place for the output; nothing was written")


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False, *, kind: str = "model",
                  replaceable: tuple[str, ...] | None = None):
    """Yield a temporary folder that becomes ``out`` only if the block finishes without error.

    ``out`` may be missing, an empty folder, or (with ``overwrite``) a folder dmquant wrote (it carries
    :data:`MARKER`; ``replaceable`` limits the kinds replaced); any other folder is never touched.
    The previous folder stays in place until the new one is complete. OSErrors (read-only place,
    full disk) become one DMQuantError, and nothing is left behind.
    """
    out = Path(out)
    check_output_folder(out, overwrite, replaceable=replaceable)
    clean_stale_folders(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise _write_error(out, exc) from exc
    try:
        try:
            _write_marker(tmp, kind)
            yield tmp
            check_output_folder(out, overwrite, replaceable=replaceable)  # nothing appeared meanwhile
            _write_marker(tmp, kind, files=_listing(tmp))  # finished: the marker lists what dmquant wrote
            _swap_in(tmp, out)
        except OSError as exc:
            raise _write_error(out, exc) from exc
    finally:
        remove_own_folder(tmp)  # still there only if the block failed (it carries the marker)


def _swap_in(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(out, old)  # the previous folder stays (beside) until the new one is in place
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        remove_own_folder(old)  # a marked previous folder, or an empty one


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_stale_folders(out: str | Path) -> list[str]:
    """Temporary siblings of ``out`` left by killed runs (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*`` whose
    process is gone): an unfinished new folder is removed; a previous folder that was moved aside is put
    back if ``out`` is missing, else removed. Those of live processes are named, not touched.
    Returns one note per folder (also printed on stderr)."""
    out = Path(out)
    notes: list[str] = []
    try:
        entries = sorted(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return notes
    for entry in entries:
        match = _STALE.match(entry.name)
        if match is None or match["name"] != out.name or not entry.is_dir() or entry.is_symlink():
            continue
        if folder_marker(entry) is None and any(entry.iterdir()):
            continue  # not ours: never touched
        pid = int(match["pid"])
        if _alive(pid):
            notes.append(f"{entry} belongs to the running process {pid}: left alone")
        elif match["what"] == "old" and not out.exists():
            os.replace(entry, out)
            notes.append(f"restored {out} from {entry.name} (a run was killed while replacing it)")
        elif remove_own_folder(entry):
            notes.append(f"removed {entry} (left by a killed run, process {pid})")
    for note in notes:
        print(f"dmquant: note: {note}", file=sys.stderr)
    return notes


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_place(path: str | Path, what: str = "--out") -> None:
    """DMQuantError unless a file or folder can be created at ``path`` (its nearest existing ancestor
    is a folder where a probe folder can be made): checked before any work starts."""
    path = Path(path)
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise DMQuantError(f"{what} {path}: {base} is not a folder: choose another {what}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dmquant-probe-", dir=base))
    except OSError as exc:
        raise DMQuantError(f"{what} {path} cannot be written ({exc.strerror or exc} in {base}): choose a "
                           f"writable place for {what}") from None


def check_output_folder(out: str | Path, overwrite: bool = False, *,
                        replaceable: tuple[str, ...] | None = None) -> None:
    """DMQuantError unless ``out`` may be written (see :func:`atomic_folder`); checked before any work."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DMQuantError(f"output {out} exists and is not a folder: choose another --out")
    if out.exists() and any(out.iterdir()):
        marker = folder_marker(out)
        if marker is None:
            raise DMQuantError(f"output folder {out} exists already and was not written by dmquant (no {MARKER}): dmquant "
                               "never deletes such a folder, even with --overwrite; choose another --out, or "
                               "empty or remove it yourself")
        if replaceable is not None and marker.get("kind") not in replaceable:
            raise DMQuantError(f"output folder {out} holds a dmquant {marker.get('kind')} folder, which this command "
                               f"does not replace (only {', '.join(replaceable)} folders): choose another --out")
        if not overwrite:
            raise DMQuantError(f"output folder {out} exists already: choose another --out, or pass --overwrite "
                               "to replace it")
    check_writable_place(out)


def save_image_atomic(image: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write a uint8 H x W x 3 image (format from the suffix) through a temporary sibling. A video
    (F x H x W x 3) is written as an animated GIF (``fps`` frames a second) when the name ends with .gif,
    else as one strip of its frames, left to right (H x F*W x 3)."""
    path = Path(path)
    check_image_path(path)
    image = np.asarray(image)
    tmp = made = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
        os.close(handle)
        tmp = Path(name)  # made here (exclusively): removed below only while it is still that same file
        made = tmp.stat()
        if image.ndim == 4 and path.suffix.lower() == ".gif":
            frames = [Image.fromarray(f) for f in image]
            frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
        else:
            Image.fromarray(np.concatenate(list(image), axis=1) if image.ndim == 4 else image).save(tmp)
        tmp.replace(path)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    finally:
        if made is not None and tmp.exists() and not tmp.is_symlink() and os.path.samestat(tmp.stat(), made):
            tmp.unlink()
    return path


def check_image_path(path: str | Path) -> None:
    """DMQuantError unless an image can be written at ``path`` (known suffix, not a folder, writable place)."""
    path = Path(path)
    suffixes = Image.registered_extensions()
    if path.suffix.lower() not in suffixes:
        raise DMQuantError(f"--out {path}: unknown image type {path.suffix!r}: end the name with .png (or .jpg)")
    if path.is_dir():
        raise DMQuantError(f"--out {path} is a folder: give an image file name such as {path / 'image.png'}")
    check_writable_place(path)


def save_run(pipe, out: str | Path, base_model: str, seconds: float | None = None, overwrite: bool = False) -> Path:
    """Save a pipeline quantized by :func:`dmquant.quantize` with its run description (under accelerate,
    call it on the main process only)."""
    info = getattr(pipe, "dmquant", None)
    if info is None:
        raise DMQuantError("this pipeline was not quantized by dmquant: call dmquant.quantize(pipe, recipe) first")
    run = {
        "format": RUN_FORMAT, "version": RUN_VERSION, "dmquant_version": __version__,
        "base_model": _portable(base_model), "recipe": info.config.name, "tag": info.config.tag,
        "denoiser": info.denoiser, "adapter": info.adapter,
        "quantized_layers": len(info.report.quantized), "excluded_layers": info.report.excluded,
        "attention_modules": len(info.report.attention), "calibration": info.calibration,
        "outliers": info.outliers,
        "seconds": None if seconds is None else round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    extra = {"run.json": json.dumps(run, indent=2), "summary.md": _summary(run),
             "recipe.yaml": yaml.safe_dump(info.config.to_dict(), sort_keys=False)}
    mixed = (info.calibration or {}).get("mixed_precision")
    if mixed:  # the plan drawn: bits per layer, the quality/size curve
        buffer = io.BytesIO()
        draw_plan(mixed).save(buffer, format="PNG")
        extra["mixed_precision.png"] = buffer.getvalue()
        extra["summary.md"] += "\n".join(plan_markdown(mixed)) + "\n"
    pipe.save_pretrained(out, overwrite=overwrite, extra_files=extra)
    return Path(out)


def _portable(spec: str) -> str:
    path = Path(spec)
    return str(path.resolve()) if path.exists() else spec


def _summary(run: dict) -> str:
    calib = run["calibration"] or {}
    return "\n".join([
        f"# dmquant run: {run['recipe']} ({run['tag']})", "",
        f"- base model: `{run['base_model']}`",
        f"- denoiser: `{run['denoiser']}` (adapter `{run['adapter']}`)",
        f"- quantized layers: {run['quantized_layers']}; kept in full precision: {len(run['excluded_layers'])}",
        f"- quantized attention modules: {run['attention_modules']}",
        f"- calibration: {calib.get('prompts', 0)} prompts, steps {calib.get('steps', [])} of "
        f"{calib.get('num_inference_steps', '-')}, {calib.get('denoiser_calls', 0)} denoiser calls",
        *_outlier_lines(run.get("outliers") or {}, calib.get("correction")),
        f"- time: {run['seconds']} s", "",
        "Load it with `dmquant.load_quantized_pipeline(folder)` or `dmquant generate --model folder`.", "",
    ])


def _outlier_lines(outliers: dict, correction: dict | None) -> list[str]:
    lines = []
    if outliers:
        lines.append(f"- outlier branches: {outliers['layers']} layers (smoothed {outliers['smoothed']}, rotated "
                     f"{outliers['rotated']}, low-rank {outliers['low_rank']}, rank capped on {outliers['rank_capped']}); "
                     f"{outliers['branch_bytes'] / 2**20:.2f} MiB of branch tensors")
    if correction:
        lines.append(f"- noise correction: {correction['method']} fitted on {correction['prompts']} prompts at "
                     f"{correction['num_inference_steps']} steps (generate with that step count)")
    return lines
