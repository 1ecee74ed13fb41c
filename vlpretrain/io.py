"""The one place that writes files: atomic file writes, JSON, atomic folder replacement, manifests, locks.

Every writer of the toolkit goes through here, so each guarantee is kept in one place:

- a file is written to a temporary name beside its target, flushed and fsynced, then renamed over it,
  so a crash leaves the old file or the new one, never half of one, and no temp file behind;
- a folder is built under a temporary name beside its target and swapped in whole (an atomic
  exchange where the kernel has one), so readers see the old folder or the new one;
- new files and folders get the permissions the user's umask gives (``mkstemp`` / ``mkdtemp``
  alone would make them private);
- JSON keeps NaN as NaN (CLIP_benchmark writes ``acc5`` as NaN below 5 classes).

Example:
    >>> from vlpretrain.io import write_json, read_json, write_folder_atomically
    >>> write_json({"acc1": 0.5}, "results/zeroshot.json")
    PosixPath('results/zeroshot.json')
    >>> write_folder_atomically(Path("out/x"), lambda tmp: (tmp / "a.txt").write_text("hi"))
    PosixPath('out/x')
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

__all__ = [
    "atomic_write", "write_text", "write_json", "write_csv", "save_figure", "FIGURE_SOFTWARE", "is_our_figure",
    "read_json", "read_manifest", "temp_folder_beside",
    "replace_folder", "write_folder_atomically", "old_sibling", "fsync_folder", "check_replaceable",
    "folder_lock",
]

PathLike = Union[str, os.PathLike]


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(folder: PathLike) -> None:
    """Make a rename inside ``folder`` durable (the entry itself lives in the folder's data)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not openable (some platforms): nothing more can be done
    try:
        os.fsync(fd)
    except OSError:
        pass  # file systems that cannot fsync a folder
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    ``write`` receives the temporary path (so numpy, pandas, faiss and matplotlib writers all fit).
    A failure removes the temporary file and leaves ``path`` as it was.

    Example:
        >>> atomic_write(Path("emb/000000.npy"), lambda tmp: np.save(open(tmp, "wb"), array))
        PosixPath('emb/000000.npy')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(Path(tmp))
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_folder(path.parent)
    return path


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically.

    Example:
        >>> write_text("report/summary.md", "# Summary\\n")
        PosixPath('report/summary.md')
    """
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(data: Any, path: PathLike) -> Path:
    """Write ``data`` as indented JSON atomically (NaN stays NaN, as CLIP_benchmark writes it).

    Example:
        >>> write_json({"metrics": {"acc1": 0.5}}, "results/zs.json")
        PosixPath('results/zs.json')
    """
    return write_text(path, json.dumps(data, indent=2))


def write_csv(path: PathLike, header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> Path:
    """Write a CSV table (a header row, then ``rows``) atomically.

    Example:
        >>> write_csv("results/summary.csv", ["task", "acc1"], [["emoji", 0.42]])
        PosixPath('results/summary.csv')
    """
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


# The PNG "Software" text chunk of every figure we write: how a rerun knows a figure it may replace is ours.
FIGURE_SOFTWARE = "vlpretrain"


def save_figure(fig: Any, path: PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure as a PNG atomically, marked as ours (``FIGURE_SOFTWARE``, see
    :func:`is_our_figure`).

    Example:
        >>> save_figure(fig, "results/curve.png", dpi=100)
        PosixPath('results/curve.png')
    """
    savefig_kwargs["metadata"] = {**(savefig_kwargs.get("metadata") or {}), "Software": FIGURE_SOFTWARE}
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs))


def is_our_figure(path: PathLike) -> bool:
    """Whether ``path`` is a PNG written by :func:`save_figure` (its "Software" chunk); False for any other
    file, PNG or not.

    Example: ``is_our_figure("runs/eval/emoji.confusion.png")``
    """
    from PIL import Image

    try:
        # Opening reads the chunks before the pixels (matplotlib writes its text there): nothing is decoded.
        with Image.open(path) as image:
            return image.info.get("Software") == FIGURE_SOFTWARE
    except Exception:  # noqa: BLE001 - any file Pillow cannot read (damaged, a decompression bomb) is not ours
        return False


def read_json(path: PathLike, advice: str = "") -> Any:
    """Parse the JSON file ``path``; a file that is not JSON gives one line naming it (and ``advice``).

    Example:
        >>> read_json("runs/demo/final/vlp_config.json")["embed_dim"]
        256
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})" + (f": {advice}" if advice else "")) from None


def read_manifest(path: PathLike, fmt: str, advice: str) -> dict[str, Any]:
    """A JSON object whose ``"format"`` is ``fmt`` (a versioned name such as ``vlpretrain-index-v1``).

    A missing file, a file that is not JSON, or another format or version is one line naming the file
    and what to do (``advice``).

    Example:
        >>> read_manifest("emb/pairs/manifest.json", "vlpretrain-embeddings-v1", "export again with `vlp embed`")
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found: {advice}")
    data = read_json(path, advice)
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{path}: format {found!r} is not {fmt!r}: {advice}")
    return data


def temp_folder_beside(out: PathLike, prefix: Optional[str] = None) -> Path:
    """A new empty folder next to ``out`` (same file system, so it can be renamed into place), with
    the permissions a plain ``mkdir`` would give. Its default name is ``.OUT.tmp-XXXX``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def check_replaceable(out: PathLike, markers: Sequence[str], what: str, advice: str, name: Optional[str] = None) -> None:
    """Refuse to let a folder write replace ``out`` unless it is missing, an empty folder, or a folder
    holding one of the ``markers`` files (so it is a ``what`` this toolkit wrote before). A user's
    other folder or file is never replaced. ``name`` is how the error names ``out`` (e.g. ``--out DIR``).

    Example:
        >>> check_replaceable("runs/wise/alpha_0.5", ["vlp_config.json"], "vlpretrain checkpoint folder",
        ...                   "choose a new folder")
    """
    out = Path(out)
    name = name or str(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{name}: exists and is not a folder; {advice}")
    if any((out / marker).is_file() for marker in markers) or not any(out.iterdir()):
        return
    raise ValueError(f"{name}: exists and is not a {what}; {advice}")


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # kernel or file system without exchange
    raise OSError(code, f"cannot swap {a} into {b}: {os.strerror(code)}")


def old_sibling(out: PathLike) -> Path:
    """Where :func:`replace_folder` parks the old folder on systems without an atomic exchange."""
    out = Path(out)
    return out.with_name(f".{out.name}.old")


def replace_folder(src: PathLike, dst: PathLike) -> None:
    """Put the finished folder ``src`` in place of ``dst`` and remove the old ``dst``.

    With an atomic exchange there is no moment without a complete ``dst``. Elsewhere the old folder
    is moved aside to ``.DST.old`` first and moved back if the second rename fails.

    Example:
        >>> replace_folder(Path(".final.tmp-x1"), Path("runs/demo/final"))
    """
    src, dst = Path(src), Path(dst)
    fsync_folder(src)
    if not dst.exists():
        os.replace(src, dst)
    elif _rename_exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # src now holds the old folder
    else:
        old = old_sibling(dst)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_folder(dst.parent)


def write_folder_atomically(out: PathLike, write: Callable[[Path], Any], prefix: Optional[str] = None) -> Path:
    """Run ``write(tmp)`` on a temporary folder beside ``out``, then swap it in with :func:`replace_folder`.

    A failure anywhere in ``write`` removes the temporary folder and leaves ``out`` as it was.

    Example:
        >>> write_folder_atomically(Path("exports/x"), lambda tmp: (tmp / "a.txt").write_text("hi"))
        PosixPath('exports/x')
    """
    out = Path(out)
    tmp = temp_folder_beside(out, prefix)
    try:
        write(tmp)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _lock_holder(fd: int) -> str:
    """The pid the holder wrote into the lock file (it writes it just after locking: may be empty yet)."""
    try:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        pid = ""
    return pid if pid.isdigit() else "unknown"


@contextlib.contextmanager
def folder_lock(folder: PathLike, advice: str = "wait for it, or choose another folder") -> Iterator[Path]:
    """Hold the one-writer lock of ``folder`` for a ``with`` block, or refuse at once.

    The lock is an ``flock`` on ``.NAME.lock`` beside ``folder`` (beside, not inside: folders are
    swapped in whole, and a lock inside would be swapped away with them). The kernel drops it when
    the process ends, even by SIGKILL, so no stale lock survives a kill; the file is removed on
    release. A second writer gets a one-line ``BlockingIOError``: ``FOLDER is being written by another
    vlp process (pid N); ADVICE``. One holder per folder and process (a second ``folder_lock`` of the
    same folder in the same process is refused too). Where ``fcntl`` is missing (Windows) nothing is locked.

    Example:
        >>> with folder_lock("indexes/pairs", "wait for it to finish, then run `vlp index add` again"):
        ...     RetrievalIndex.load("indexes/pairs").add("emb/more")
    """
    try:
        import fcntl
    except ImportError:  # no flock on this platform
        yield Path(folder)
        return
    folder = Path(os.path.abspath(folder))
    path = folder.with_name(f".{folder.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # mode through the umask, like any new file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise BlockingIOError(f"{folder} is being written by another vlp process (pid {holder}); "
                                  f"{advice}") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        # The previous holder removes the file on release: if it did so after our open, we hold the
        # lock of a removed file that nobody else will see, so lock the file now at the path instead.
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        try:
            os.unlink(path)  # while still locked: a waiter that opened it retries on the new file
        except FileNotFoundError:
            pass
        os.close(fd)
