"""Memory versions on disk: a base memory and, per `learn`, the rows it changed.

    HOME/memory/base/                 memory.safetensors + memory_config.json (save_memory), model.json
    HOME/memory/versions/v0003/       rows.safetensors (per layer: changed row ids and their new values)
                                      reads.safetensors (per layer: the slots its examples read, counts)
                                      manifest.json (parent version, documents learned, stats, date)
    HOME/memory/CURRENT               the version the model runs with (0 = base)

A version holds the changed rows relative to its parent, so applying base -> ... -> v reproduces v
exactly. Every file is written to a temporary name and renamed, so a crash never leaves half a
version; rollback only moves CURRENT, and later versions stay on disk.
"""
import json
import os
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..integrations import load_memory, memory_layers, save_memory


def _write_atomic(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MemoryStore:
    def __init__(self, home):
        self.root = Path(home) / "memory"
        self.base = self.root / "base"
        self.versions_dir = self.root / "versions"

    # ---- base ---------------------------------------------------------------------------------

    def has_base(self):
        return (self.base / "memory_config.json").exists()

    def save_base(self, model, model_name):
        tmp = self.root / "base.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        save_memory(model, tmp)
        (tmp / "model.json").write_text(json.dumps({"model": model_name}))
        os.replace(tmp, self.base)
        self.set_current(0)

    def base_model_name(self):
        return json.loads((self.base / "model.json").read_text())["model"]

    # ---- versions -----------------------------------------------------------------------------

    def current(self):
        path = self.root / "CURRENT"
        return int(path.read_text()) if path.exists() else 0

    def set_current(self, version):
        if version and not (self._dir(version) / "manifest.json").exists():
            raise ValueError(f"memory version {version} does not exist; see `engram memory list`")
        _write_atomic(self.root / "CURRENT", str(version))

    def _dir(self, version):
        return self.versions_dir / f"v{version:04d}"

    def manifest(self, version):
        return json.loads((self._dir(version) / "manifest.json").read_text())

    def versions(self):
        """Manifests of every saved version, oldest first."""
        if not self.versions_dir.exists():
            return []
        # vNNNN.tmp: a version whose save was cut off before its rename; the next save reuses it
        found = [int(p.name[1:]) for p in self.versions_dir.iterdir()
                 if re.fullmatch(r"v\d+", p.name) and (p / "manifest.json").exists()]
        return [self.manifest(v) for v in sorted(found)]

    def chain(self, version):
        """Versions to apply on the base to reach `version`, in order."""
        chain = []
        while version:
            chain.append(version)
            version = self.manifest(version)["parent"]
        return chain[::-1]

    def save_version(self, model, before, documents, stats, reads=None):
        """Write the rows of each memory layer that differ from `before` ({layer: values}) as a new
        version whose parent is the current one, with the slot reads of what it learned (`reads`:
        ({layer: counts}, tokens), see learned_reads); make it current; return its number."""
        version = max([m["version"] for m in self.versions()], default=0) + 1
        tensors, changed = {}, {}
        for layer, memory in memory_layers(model).items():
            rows = (memory.values.detach() != before[layer]).any(1).nonzero().flatten()
            tensors[f"layers.{layer}.rows"] = rows.cpu()
            tensors[f"layers.{layer}.values"] = memory.values.detach()[rows].cpu().contiguous()
            changed[str(layer)] = rows.numel()
        manifest = {"version": version, "parent": self.current(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "documents": list(documents), "rows_changed": changed, "stats": stats}
        tmp = self.versions_dir / f"v{version:04d}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(tensors, tmp / "rows.safetensors")
        if reads is not None:
            save_file(_sparse_reads(*reads), tmp / "reads.safetensors")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, self._dir(version))
        self.set_current(version)
        return version

    # ---- loading ------------------------------------------------------------------------------

    def load_into(self, model, version=None):
        """Add the base memory to `model` and apply the chain up to `version` (default: current)."""
        load_memory(model, self.base)
        layers = memory_layers(model)
        for v in self.chain(self.current() if version is None else version):
            tensors = load_file(self._dir(v) / "rows.safetensors")
            with torch.no_grad():
                for layer, memory in layers.items():
                    rows = tensors[f"layers.{layer}.rows"].to(memory.values.device)
                    memory.values[rows] = tensors[f"layers.{layer}.values"].to(memory.values)
        return model

    def learned_reads(self, model, version=None):
        """({layer: slot reads}, tokens) summed over the versions on the chain to `version` (default:
        current): what the memory learned so far read, for slots.with_learned; None before any learn."""
        paths = [self._dir(v) / "reads.safetensors" for v in self.chain(self.current() if version is None else version)]
        paths = [p for p in paths if p.exists()]
        if not paths:
            return None
        counts = {layer: torch.zeros(m.n_slots, dtype=torch.long) for layer, m in memory_layers(model).items()}
        tokens = 0
        for path in paths:
            tensors = load_file(path)
            tokens += int(tensors["tokens"])
            for layer, total in counts.items():
                total.index_add_(0, tensors[f"layers.{layer}.slots"], tensors[f"layers.{layer}.counts"])
        return counts, tokens


def _sparse_reads(counts, tokens):
    tensors = {"tokens": torch.tensor(int(tokens))}
    for layer, dense in counts.items():
        slots = dense.nonzero().flatten()
        tensors[f"layers.{layer}.slots"] = slots.cpu()
        tensors[f"layers.{layer}.counts"] = dense[slots].long().cpu()
    return tensors
