"""scripts/triton_sass_stats.py's reading of SASS loops (the static proxy sessions without a GPU rely on)."""
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import triton_sass_stats as stats  # noqa: E402


def _body(*lines):
    """(address, predicate, opcode, operands) rows, 16 bytes apart."""
    return [(16 * i, "", op, operands) for i, (op, operands) in enumerate(lines)]


def test_a_load_read_at_once_is_early_and_one_read_a_loop_later_is_not():
    body = _body(("LDG.E.U16.CONSTANT", "R37, desc[UR12][R110.64+0x2]"),
                 ("LDG.E.128.CONSTANT", "R24, desc[UR12][R16.64]"),
                 ("PRMT", "R146, R146, 0x5410, R37"),
                 *[("FFMA", "R1, R2, R3, R4")] * stats.EARLY_READ,
                 ("IMAD.MOV.U32", "R64, RZ, RZ, R27"))  # R27: the 128-bit load's last register
    assert stats.early_reads(body) == (2, 1)


def test_a_register_overwritten_before_any_read_ends_the_scan():
    body = _body(("LDG.E.64.CONSTANT", "R8, desc[UR12][R2.64]"),
                 ("MOV", "R8, RZ"), ("MOV", "R9, RZ"),
                 ("IADD3", "R6, R8, 0x1, RZ"))  # reads the zero, not the load
    assert stats.early_reads(body) == (1, 0)


def test_a_store_of_the_loaded_register_reads_it():
    body = _body(("LDG.E", "R5, desc[UR12][R2.64]"), ("STG.E", "desc[UR12][R10.64], R5"))
    assert stats.early_reads(body) == (1, 1)
