"""iSCSI names (RFC 7143 §4.2.7): the iqn., eui. and naa. forms."""

from __future__ import annotations

import re
import stringprep
import unicodedata

_NAME = re.compile(r"^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[^\s\x00-\x1f\x7f]+)?|eui\.[0-9A-Fa-f]{16}|naa\.[0-9A-Fa-f]{16}([0-9A-Fa-f]{16})?)$")
MAX_NAME_BYTES = 223


def check_iqn(name: str) -> str:
    """Return ``name`` if it is an iSCSI name, else raise ``ValueError`` saying what is expected."""
    if not _NAME.fullmatch(name) or len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"{name!r} is not an iSCSI name (iqn.YYYY-MM.reversed.domain[:id], eui.… or naa.…)")
    return name


def normalize_name(name: str) -> str:
    """The form in which two iSCSI names are compared: RFC 7143 §4.2.7.2 has names go through the stringprep
    profile of RFC 3722, whose mapping (RFC 3454 tables B.1, dropped, and B.2, case folding) and
    normalization (NFKC) make ``IQN.2026-11.IO.Example:Host`` and ``iqn.2026-11.io.example:host`` one name:
    an initiator or target name given in another case than configured is the same node, never another one.
    Only the comparison uses it; a name is kept, shown and used (CHAP) as it was given."""
    if name.isascii():  # B.1 holds no ASCII character, B.2 maps ASCII to lower case, NFKC leaves ASCII alone
        return name.lower()
    mapped = "".join(stringprep.map_table_b2(char) for char in name if not stringprep.in_table_b1(char))
    return unicodedata.normalize("NFKC", mapped)
