"""On-disk embedding cache for evaluation: re-running an eval embeds nothing twice.

One `.npy` matrix plus a `.keys.json` list of text hashes per embedder, keyed by the embedder's name and dim,
under `<tierserve data dir>/eval-cache/embeddings/`. Missing texts are embedded in batches (with a progress
bar) and appended; the files are replaced atomically, so an interrupted run loses only its new rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from router.embed import Embedder

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/tierserve"


def default_cache_dir() -> Path:
    """`$TIERSERVE_DATA_DIR/eval-cache` (the app's data dir), else `~/.cache/tierserve/eval-cache`."""
    return Path(os.environ.get("TIERSERVE_DATA_DIR") or DEFAULT_CACHE_DIR).expanduser() / "eval-cache"


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeds texts through `embedder`, remembering every vector on disk."""

    def __init__(self, embedder: Embedder, directory: str | os.PathLike | None = None, *, batch_size: int = 256):
        self.embedder = embedder
        self.batch_size = batch_size
        root = Path(directory) if directory else default_cache_dir()
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{embedder.name}-{embedder.dim}")
        self._matrix_path = root / "embeddings" / f"{stem}.npy"
        self._keys_path = root / "embeddings" / f"{stem}.keys.json"
        self._index: dict[str, int] = {}
        self._matrix = np.zeros((0, embedder.dim), dtype=np.float32)
        self._load()

    @property
    def name(self) -> str:
        return self.embedder.name

    def embed(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors, from the cache where possible."""
        keys = [text_key(t) for t in texts]
        missing: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._index and k not in missing:
                missing[k] = t
        if missing:
            self._add(list(missing), list(missing.values()), progress)
        return self._matrix[[self._index[k] for k in keys]]

    def _add(self, keys: list[str], texts: list[str], progress: bool) -> None:
        chunks = []
        bar = tqdm(total=len(texts), desc=f"embedding ({self.embedder.name})", unit="text", disable=not progress)
        for start in range(0, len(texts), self.batch_size):
            chunk = self.embedder.embed(texts[start : start + self.batch_size])
            chunks.append(np.asarray(chunk, dtype=np.float32))
            bar.update(len(chunk))
        bar.close()
        base = len(self._matrix)
        self._matrix = np.concatenate([self._matrix, *chunks])
        self._index.update({k: base + i for i, k in enumerate(keys)})
        self._save()

    def _load(self) -> None:
        if not (self._matrix_path.is_file() and self._keys_path.is_file()):
            return
        try:
            matrix = np.load(self._matrix_path)
            keys = json.loads(self._keys_path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("embedding cache %s unreadable (%s); starting empty", self._matrix_path, exc)
            return
        if matrix.shape != (len(keys), self.embedder.dim):
            logger.warning("embedding cache %s has shape %s for %d keys; starting empty",
                           self._matrix_path, matrix.shape, len(keys))
            return
        self._matrix = matrix.astype(np.float32, copy=False)
        self._index = {k: i for i, k in enumerate(keys)}

    def _save(self) -> None:
        self._matrix_path.parent.mkdir(parents=True, exist_ok=True)
        keys = [None] * len(self._index)
        for k, i in self._index.items():
            keys[i] = k
        tmp_matrix = self._matrix_path.with_suffix(".tmp.npy")
        tmp_keys = self._keys_path.with_suffix(".tmp")
        np.save(tmp_matrix, self._matrix)
        tmp_keys.write_text(json.dumps(keys))
        os.replace(tmp_matrix, self._matrix_path)
        os.replace(tmp_keys, self._keys_path)
