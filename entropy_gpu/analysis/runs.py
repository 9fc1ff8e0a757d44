"""Scaling and fault tolerance shared by the long analyses (``entropy-gpu sia``, ``grad-report``).

- ``Ranks``: data parallelism under ``torchrun`` (rank, world size, local device from the
  environment; ``torch.distributed`` with NCCL on CUDA, gloo on CPU). Item ``i`` of a run
  belongs to rank ``i % world_size``; results are gathered with ``all_gather_object`` over
  a gloo group and put back in item order, so every world size writes the same files.
- ``RecordLog``: crash-safe, resumable records. Each rank appends finished items to its
  own JSONL part file under ``OUT/records/`` and fsyncs after every line; a torn last
  line (a kill mid-write) is cut off when the file is reopened; records are keyed by item
  index, so a rerun skips what any rank already finished.
- ``check_run_config``: the run's config is stored in ``OUT/run.json``; a rerun with a
  different config refuses to mix results unless told to start over (``overwrite``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RUN_FILE = "run.json"
RECORDS_DIR = "records"
# Test hooks: a process kills itself with SIGKILL after writing this many records, or, with
# ENTROPY_GPU_CRASH_TORN=1, in the middle of writing the next one.
CRASH_AFTER_ENV = "ENTROPY_GPU_CRASH_AFTER_RECORDS"
CRASH_TORN_ENV = "ENTROPY_GPU_CRASH_TORN"


@dataclass
class Ranks:
    """This process's place in a data-parallel run (``rank 0 of 1`` without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item ``index`` is this rank's (round robin: balanced for any item cost trend)."""
        return index % self.world_size == self.rank

    def gather(self, items: list) -> list:
        """Every rank's ``items`` concatenated in rank order, on every rank (gloo object collective)."""
        if self.world_size == 1:
            return list(items)
        import torch.distributed as dist

        parts: list[list | None] = [None] * self.world_size
        dist.all_gather_object(parts, list(items), group=_object_group())
        return [x for part in parts for x in part]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=_object_group())

    def close(self, failed: bool = False) -> None:
        """Leave the process group if this object created it: after a barrier, or at once
        when this rank ``failed`` (the others may be waiting in another collective; the
        launcher stops them when this process exits with an error)."""
        if self.initialized_here:
            import torch.distributed as dist

            global _OBJECT_GROUP
            if not failed:
                self.barrier()
            dist.destroy_process_group()
            _OBJECT_GROUP = None
            self.initialized_here = False


_OBJECT_GROUP = None


def _object_group():
    """A gloo group for Python-object collectives (the default group may be NCCL)."""
    global _OBJECT_GROUP
    import torch.distributed as dist

    if _OBJECT_GROUP is None:
        _OBJECT_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _OBJECT_GROUP


def init_ranks(device: str = "cpu") -> Ranks:
    """Join the ``torchrun`` process group if this process was started by one.

    ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` come from the launcher (``torchrun``, also for
    multi-node with ``--nnodes``/``--rdzv-endpoint``). ``device`` is the user's choice:
    ``cuda`` becomes ``cuda:LOCAL_RANK`` with NCCL, ``cpu`` stays CPU with gloo. Without a
    launcher: rank 0 of 1 on ``device``. An existing process group is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(device=device)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = torch.device(device).type
    if kind == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        initialized_here = True
    return Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
                 initialized_here=initialized_here)


@contextmanager
def ranks_for_run(ranks: Ranks | None, device: str = "cpu") -> Iterator[Ranks]:
    """``ranks`` as given (the caller owns it), or joined with ``init_ranks`` and closed
    at the end, as a failure if the run raised (a failing rank must not wait at a barrier)."""
    if ranks is not None:
        yield ranks
        return
    ranks = init_ranks(device)
    try:
        yield ranks
    except BaseException:
        ranks.close(failed=True)
        raise
    ranks.close()


def stored_run_config(out_dir: str | Path) -> dict | None:
    """The config stored in ``OUT/run.json`` by an earlier run, or None."""
    path = Path(out_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to ``{"a.b": value}``."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


_ABSENT = object()


def _shown(value: Any, limit: int = 60) -> str:
    if value is _ABSENT:
        return "(not set)"
    plain = isinstance(value, str) and value and value.isprintable() and value.strip() == value
    text = value if plain else json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def config_differences(stored: dict, config: dict, flags: Mapping[str, str] | None = None) -> list[str]:
    """What differs between two run configs, one entry per flag: ``"--estimator: next_token ->
    sampled"``. ``flags`` maps a (dotted) key of the config to the command-line flag that sets it;
    keys without a flag are named by their key. The first flag is shown once."""
    flags = flags or {}
    old, new = _leaves(stored), _leaves(config)
    seen: set[str] = set()
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: (k not in flags, k)):
        before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if before == after or {id(before), id(after)} == {id(_ABSENT), id(None)}:
            continue  # (None against absent: a section the other run has, e.g. generation settings)
        name = flags.get(key) or flags.get(key.split(".", 1)[0]) or key
        if name in seen:
            continue
        seen.add(name)
        out.append(f"{name}: {_shown(before)} -> {_shown(after)}")
    return out


def check_run_config(out_dir: str | Path, config: dict, *, overwrite: bool = False,
                     ranks: Ranks | None = None, record_dirs: Iterable[str] = (RECORDS_DIR,),
                     flags: Mapping[str, str] | None = None) -> None:
    """Store ``config`` in ``OUT/run.json``, or check it against the stored one.

    Same config: the run resumes (finished records are kept). Different config: ValueError
    naming what differs (as the command-line ``flags`` that set each key, see
    ``config_differences``), unless ``overwrite``, which deletes the earlier records
    (``record_dirs``, relative to ``out_dir``). Rank 0
    decides and writes; the other ranks wait for it and raise the same error.
    """
    ranks = ranks or Ranks()
    out = Path(out_dir)
    error = ""
    if ranks.is_main:
        path = out / RUN_FILE
        stored = json.loads(path.read_text()) if path.is_file() else None
        config = json.loads(json.dumps(config))  # as it reads back
        if stored is not None and stored != config and not overwrite:
            changes = "; ".join(config_differences(stored, config, flags))
            error = (f"{out} holds results of a run with other arguments (differs in: {changes}); "
                     f"use another output folder, or --overwrite to start over")
        else:
            if overwrite or stored != config:
                for folder in record_dirs:
                    shutil.rmtree(out / folder, ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, json.dumps(config, indent=1, sort_keys=True) + "\n")
    errors = ranks.gather([error])
    if errors[0]:
        raise ValueError(errors[0])
    ranks.barrier()


class RecordLog:
    """Append-only JSONL records of one rank, keyed by ``record["index"]``.

    Opening reads every rank's part file in ``OUT/records`` (a run may resume with another
    world size), keeps the first record of each index, and cuts a torn last line off this
    rank's own file. ``append`` writes one line, flushes and fsyncs it before returning.
    """

    def __init__(self, out_dir: str | Path, ranks: Ranks | None = None, name: str = "records"):
        self.ranks = ranks or Ranks()
        self.dir = Path(out_dir) / RECORDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{name}.rank{self.ranks.rank}.jsonl"
        _drop_torn_tail(self.path)
        # Records this rank's file holds (written by a rank of this number in any run so far).
        self.mine: dict[int, dict] = {}
        for record in read_records(self.path):
            self.mine.setdefault(int(record["index"]), record)
        # Finished anywhere: every part file this rank can see (a shared folder, or only its
        # node's), merged over ranks, so a node-local folder works too. read_records stops
        # before another rank's torn line.
        seen = {int(r["index"]) for part in self.dir.glob(f"{name}.rank*.jsonl") for r in read_records(part)}
        self.done: set[int] = set(self.ranks.gather(sorted(seen)))
        self._file = self.path.open("a", encoding="utf-8")
        self._written = 0
        self._crash_after = int(os.environ.get(CRASH_AFTER_ENV, "0"))

    def __contains__(self, index: int) -> bool:
        return index in self.done

    def append(self, record: dict) -> None:
        """Write ``record`` (a JSON object with an int ``index``) durably."""
        index = int(record["index"])
        if index in self.done:
            raise ValueError(f"record {index} is already in {self.dir}")
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._crash_after and self._written >= self._crash_after:
            self._die(line)
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.add(index)
        self.mine[index] = record
        self._written += 1
        if self._crash_after and self._written >= self._crash_after and not os.environ.get(CRASH_TORN_ENV):
            self._die("")

    def _die(self, line: str) -> None:
        """Test hook: SIGKILL this process, after writing the first half of ``line``."""
        import signal

        if line:
            self._file.write(line[:len(line) // 2])
            self._file.flush()
            os.fsync(self._file.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        self._file.close()

    def gathered(self) -> list[dict]:
        """All records of all ranks, by index (collective: every rank must call it)."""
        merged: dict[int, dict] = {}
        for record in self.ranks.gather(list(self.mine.values())):
            merged.setdefault(int(record["index"]), record)
        return [merged[i] for i in sorted(merged)]


def code_commit() -> dict[str, Any]:
    """The commit of the entropy-gpu code that runs and whether tracked files differ from it.

    ``{"commit": None, "dirty": None}`` outside a git checkout (an installed wheel).
    """
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def read_records(path: str | Path) -> Iterator[dict]:
    """The complete records of a JSONL part file, in file order; a torn last line (no
    newline, or not valid JSON) is skipped, a bad line before the end is an error."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open("rb") as f:
        lines = f.read().split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (torn or empty)
    for n, line in enumerate(complete):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(complete) - 1 and not tail:
                return  # a torn last line that happened to end in a newline byte: dropped
            raise ValueError(f"{path}:{n + 1}: corrupt record (not JSON) before the end of the file") \
                from None
        yield record


def _drop_torn_tail(path: Path) -> None:
    """Truncate ``path`` after its last complete, valid JSON line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    keep = len(data)
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[last_start:])
        except json.JSONDecodeError:
            keep = last_start
    if keep != len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def _atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` to ``path``, replaced atomically."""
    _atomic_write(Path(path), text)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """``rows`` as a JSONL file, replaced atomically."""
    _atomic_write(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, replaced atomically."""
    _atomic_write(Path(path), json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def progress(total: int, desc: str, ranks: Ranks, enabled: bool = True, unit: str = "trace"):
    """A tqdm bar (rate and ETA) on rank 0 only; a no-op bar on the other ranks."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and ranks.is_main),
                dynamic_ncols=True)


__all__ = ["CRASH_AFTER_ENV", "CRASH_TORN_ENV", "RECORDS_DIR", "RUN_FILE", "RecordLog", "Ranks",
           "check_run_config", "init_ranks", "ranks_for_run",
           "progress", "read_records", "write_json", "write_jsonl", "write_text_atomic"]
