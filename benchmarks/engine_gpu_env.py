"""Running `engine_gpu.py` on a lent GPU machine: one command, a hard deadline, nothing lost.

- `RunClock`: the deadline counts from the process start (carried across the re-exec that switches
  to the pinned transformers wheel, so pip time is counted). SIGALRM raises `Cut` inside whatever
  part runs when its time box or the whole deadline expires; SIGTERM (the run tool's timeout) raises
  it too, once, so the driver can write what it has. `Cut` is a BaseException: the `except Exception`
  that keeps one failed part from losing the others does not swallow it.
- `tee_output`: stdout/stderr also go, line by line, into a log file next to the results ($OUT), and
  faulthandler dumps every thread's stack there if the process is still alive past the deadline
  (a hang inside CUDA or the compiler shows where it hung).
- `use_pinned_transformers`, `ensure_pydantic`: the device has other package versions than this
  project pins and may lack pydantic.
"""
from __future__ import annotations

import contextlib
import copy
import faulthandler
import importlib.metadata
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

T0_ENV = "STITCHSERVE_BENCH_T0"  # process start, inherited by the re-executed process
PINNED_TRANSFORMERS = "5.23.0"


def process_start() -> float:
    """Wall-clock start of this benchmark run; the first process records it for its re-exec."""
    t0 = os.environ.get(T0_ENV)
    if t0 is None:
        t0 = str(time.time())
        os.environ[T0_ENV] = t0
    return float(t0)


class Cut(BaseException):
    """A part was stopped: reason 'time box', 'deadline' or 'SIGTERM'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RunClock:
    """A hard deadline `budget_s` after `t0`, and one time box at a time inside it (a part's cap)."""

    def __init__(self, t0: float, budget_s: float) -> None:
        self.t0, self.end = t0, t0 + budget_s
        self.box_end: float | None = None
        self.in_box = False  # Cut is raised only inside a box; elsewhere a signal only sets `stopped`
        self.shield = 0  # > 0 while results are written: a Cut waits in `pending` until the block ends
        self.pending: str | None = None
        self.stopped: str | None = None  # why nothing more may start ('deadline', 'SIGTERM')
        self._old: dict = {}

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self) -> float:
        return self.end - time.time()

    def install(self) -> None:
        """Signal handlers (main thread only) and the alarm for the whole deadline."""
        self._old = {s: signal.signal(s, h) for s, h in ((signal.SIGALRM, self._on_alarm),
                                                         (signal.SIGTERM, self._on_term))}
        self._arm()

    def uninstall(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _arm(self) -> None:
        if self.stopped:
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        end = min(self.end, self.box_end if self.box_end is not None else self.end)
        signal.setitimer(signal.ITIMER_REAL, max(end - time.time(), 1e-3))

    def _cut(self, reason: str) -> None:
        if not self.in_box:
            return  # between parts: the driver sees `stopped` before starting the next
        if self.shield:
            self.pending = reason
            return
        raise Cut(reason)

    def _on_alarm(self, signum, frame) -> None:
        now = time.time()
        if now >= self.end:
            self.stopped = "deadline"
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._cut("deadline")
        elif self.in_box and self.box_end is not None and now >= self.box_end:
            self.box_end = None
            self._arm()
            self._cut("time box")
        else:
            self._arm()  # woke a little early: wait for the rest

    def _on_term(self, signum, frame) -> None:
        if self.stopped == "SIGTERM":
            return  # a second TERM while writing results: let the writing finish
        self.stopped = "SIGTERM"
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._cut("SIGTERM")

    @contextlib.contextmanager
    def box(self, seconds: float | None):
        """Run the enclosed part until it ends, `seconds` pass (None: no cap) or the deadline; the
        last two raise Cut inside it. A deadline already past raises at once."""
        self.box_end = time.time() + seconds if seconds is not None else None
        self.in_box = True
        try:
            if self.stopped:
                raise Cut(self.stopped)
            self._arm()
            yield
        finally:
            self.in_box = False
            self.box_end = None
            self.pending = None
            self._arm()

    @contextlib.contextmanager
    def shielded(self):
        """No Cut while writing results: one that comes meanwhile is raised when the block ends.
        (A flag, not a signal mask: a mask is per thread, and the OS may deliver to another thread.)"""
        self.shield += 1
        try:
            yield
        finally:
            self.shield -= 1
        if not self.shield and self.pending:
            reason, self.pending = self.pending, None
            if self.in_box:
                raise Cut(reason)


class _Tee:
    def __init__(self, stream, log) -> None:
        self.stream, self.log = stream, log

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.stream.flush()
        self.log.write(s)
        self.log.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding...: the real stream's
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_output(path: Path, hang_dump_after_s: float | None = None):
    """Copy stdout/stderr into `path` (appended: the re-executed process continues the same log)."""
    log = open(path, "a", buffering=1, encoding="utf-8")
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    if hang_dump_after_s is not None:
        faulthandler.dump_traceback_later(max(hang_dump_after_s, 1.0), exit=False, file=log)
    try:
        yield
    finally:
        if hang_dump_after_s is not None:
            faulthandler.cancel_dump_traceback_later()
        sys.stdout, sys.stderr = saved
        log.close()


def use_pinned_transformers(wheel_dir: Path, timeout_s: float) -> str:
    """If the installed transformers is not the pinned one and its wheel was carried (in `.whl/`),
    install it into a private directory and re-run this script with it first on the path. It is
    used only if it imports cleanly with the machine's other packages; otherwise the installed
    version is kept (the correctness part checks the layer API the engine relies on)."""
    have = importlib.metadata.version("transformers")
    if os.environ.get("STITCHSERVE_PINNED_TF") == "1":
        return f"{have} (carried wheel)"
    if have == PINNED_TRANSFORMERS:
        return f"{have} (installed)"
    wheels = sorted(wheel_dir.glob(f"transformers-{PINNED_TRANSFORMERS}-*.whl"))
    if not wheels:
        return f"{have} (installed; no carried {PINNED_TRANSFORMERS} wheel in {wheel_dir})"
    target = Path("/tmp/stitchserve-transformers")
    env = dict(os.environ, STITCHSERVE_PINNED_TF="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p))
    t = time.time()
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                        "--target", str(target), str(wheels[-1])], check=True, capture_output=True, timeout=timeout_s)
        subprocess.run([sys.executable, "-c", "import transformers.models.llama.modeling_llama"], env=env, check=True,
                       capture_output=True, timeout=timeout_s)
    except (subprocess.SubprocessError, OSError) as e:
        return f"{have} (installed; carried {PINNED_TRANSFORMERS} unusable here: {type(e).__name__})"
    print(f"[setup] carried transformers {PINNED_TRANSFORMERS} installed in {time.time() - t:.0f}s; re-executing",
          flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)  # does not return


def ensure_pydantic() -> str:
    """stitchlib's config classes use pydantic (BaseModel, Field, ValidationError, ConfigDict and the
    validator decorators). Install a minimal stand-in when the package is missing: defaults,
    model_copy/model_dump/model_validate/model_fields_set, no checks (validators are not run)."""
    try:
        import pydantic
        return pydantic.VERSION
    except ImportError:
        pass
    mod = types.ModuleType("pydantic")

    class ValidationError(ValueError):
        def errors(self):
            return [{"loc": (), "msg": str(self)}]

    class FieldInfo:
        def __init__(self, default=..., default_factory=None):
            self.default, self.default_factory = default, default_factory

    def Field(default=..., *, default_factory=None, **_):
        return FieldInfo(default, default_factory)

    class BaseModel:
        __stub_fields__: dict = {}

        def __init_subclass__(cls, **kw):
            super().__init_subclass__(**kw)
            fields = {}
            for base in reversed(cls.__mro__[1:]):
                fields.update(getattr(base, "__stub_fields__", {}))
            for name in inspect.get_annotations(cls):
                if name.startswith("_") or name == "model_config":
                    continue
                v = cls.__dict__.get(name, ...)
                fields[name] = v if isinstance(v, FieldInfo) else FieldInfo(v)
            cls.__stub_fields__ = fields

        def __init__(self, **data):
            object.__setattr__(self, "model_fields_set", set(data) & set(self.__stub_fields__))
            for name, f in self.__stub_fields__.items():
                if name in data:
                    val = data.pop(name)
                elif f.default_factory is not None:
                    val = f.default_factory()
                elif f.default is not ...:
                    val = copy.copy(f.default)
                else:
                    raise ValidationError(f"{type(self).__name__}.{name}: field required")
                object.__setattr__(self, name, val)
            if data:
                raise ValidationError(f"{type(self).__name__}: unexpected fields {sorted(data)}")

        def model_copy(self, update=None, deep=False):
            new = copy.deepcopy(self) if deep else copy.copy(self)
            for k, v in (update or {}).items():
                object.__setattr__(new, k, v)
            object.__setattr__(new, "model_fields_set", self.model_fields_set | set(update or {}))
            return new

        def model_dump(self, **_):
            def dump(v):
                if isinstance(v, BaseModel):
                    return v.model_dump()
                if isinstance(v, dict):
                    return {k: dump(x) for k, x in v.items()}
                if isinstance(v, (list, tuple)):
                    return type(v)(dump(x) for x in v)
                return v
            return {k: dump(getattr(self, k)) for k in self.__stub_fields__}

        def model_dump_json(self, indent=None, **_):
            return json.dumps(self.model_dump(), indent=indent, default=str)

        @classmethod
        def model_validate(cls, obj):
            return obj if isinstance(obj, cls) else cls(**obj)

        def __eq__(self, other):
            return type(self) is type(other) and self.model_dump() == other.model_dump()

        def __repr__(self):
            return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__stub_fields__)})"

    def _no_check(*_, **__):  # field_validator("x") / model_validator(mode=...): the stand-in runs no checks
        return lambda fn: fn

    mod.BaseModel, mod.Field, mod.ValidationError, mod.VERSION = BaseModel, Field, ValidationError, "stub"
    mod.ConfigDict, mod.field_validator, mod.model_validator = dict, _no_check, _no_check
    sys.modules["pydantic"] = mod
    return "stub (pydantic not installed)"
