"""Memory versions on disk: what a save cut off before its rename leaves must not break the store."""
import json

from engram_kernels.trainer.versions import MemoryStore


def _version_dir(store, name, version):
    path = store.versions_dir / name
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"version": version, "parent": version - 1}))


def test_a_staged_version_left_by_a_crash_is_ignored(tmp_path):
    store = MemoryStore(tmp_path)
    _version_dir(store, "v0001", 1)
    _version_dir(store, "v0002.tmp", 2)  # killed after writing its manifest, before the rename
    assert [m["version"] for m in store.versions()] == [1]
    assert store.chain(1) == [1]
