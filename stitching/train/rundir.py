"""The run directory: what one run writes, written so that nothing already there is lost or corrupted.

Files: ``config.yaml`` (the resolved config: the whole truth of the run), ``metrics.csv`` (a row per
epoch), ``result.csv`` (one row when finished; its presence means finished), ``checkpoint.pt`` (trainable
weights, optimizer, scheduler, scaler, RNG states, position; loads with ``torch.load(weights_only=True)``),
``model.safetensors`` (the final model, with the config in its metadata) and ``train.log``.
Every file is written to a temporary name and renamed into place. ``--force`` moves an earlier run's files
into ``previous/<timestamp>/`` instead of deleting them.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import time
from pathlib import Path

import torch

FILES = ("config.yaml", "metrics.csv", "result.csv", "checkpoint.pt", "model.safetensors", "train.log")


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return (self.path / "result.csv").is_file()

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write(self.path / name, text.encode())

    def write_rows(self, name: str, columns: list[str], rows: list[dict]) -> Path:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return self.write_text(name, buf.getvalue())

    def read_rows(self, name: str) -> list[dict]:
        path = self.path / name
        if not path.is_file():
            return []
        with path.open(newline="") as f:
            return list(csv.DictReader(f))

    def save_checkpoint(self, state: dict) -> None:
        tmp = self.path / f".checkpoint.pt.tmp{os.getpid()}"
        torch.save(state, tmp)
        _fsync(tmp)
        os.replace(tmp, self.path / "checkpoint.pt")

    def load_checkpoint(self) -> dict | None:
        path = self.path / "checkpoint.pt"
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def archive(self) -> Path | None:
        """Move the files of an earlier run into ``previous/<timestamp>/`` (``--force``)."""
        present = [self.path / f for f in FILES if (self.path / f).exists()]
        if not present:
            return None
        dest = self.path / "previous" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for f in present:
            shutil.move(str(f), dest / f.name)
        return dest


def comparable_config(d: dict) -> dict:
    """A resolved config without what does not change the run (its own directory): two runs are the same
    run, and may share a directory, exactly when these are equal."""
    d = {k: dict(v) for k, v in d.items()}
    d.get("output", {}).pop("dir", None)
    return d


def atomic_write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, path)
    return path


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
