"""The shipped texts: every name reads, and no held-out text shares a 200-character piece with a calibration
text (a model evaluated on a held-out text was never calibrated, fitted or healed on any of it)."""

from __future__ import annotations

import pytest

from depthprune.data.calibration import read_text
from depthprune.data.shipped import EVAL_DOMAINS, calibration_texts, heldout_texts, shipped_names

PIECE = 200


def shared_piece(heldout: str, calibration: list[str], size: int = PIECE) -> str | None:
    """A ``size``-character piece of ``heldout`` found in some calibration text, else None.

    Any common piece of ``size`` characters contains a piece of ``size // 2`` characters that starts at a
    multiple of ``size // 2`` in the calibration text, so only those are indexed; each candidate found through
    them is then checked in full.
    """
    step = size // 2
    index = {text[i : i + step] for text in calibration for i in range(0, len(text) - step + 1, step)}
    for i in range(len(heldout) - step + 1):
        if heldout[i : i + step] in index:
            for start in range(max(0, i - step), i + 1):
                piece = heldout[start : start + size]
                if len(piece) == size and any(piece in text for text in calibration):
                    return piece
    return None


def test_shared_piece_finds_an_overlap_anywhere() -> None:
    calibration = ["x" * 37 + "".join(chr(65 + i % 26) for i in range(400)) + "y" * 11]
    heldout = "z" * 5 + calibration[0][100:320] + "q" * 50
    assert shared_piece(heldout, calibration) == calibration[0][100:300]
    assert shared_piece(heldout[:110] + "!" + heldout[111:], calibration) is None  # no 200 in a row remain
    assert shared_piece("q" * 600, calibration) is None


@pytest.mark.parametrize("text", heldout_texts(), ids=lambda t: t.name)
def test_heldout_texts_share_nothing_with_calibration_texts(text) -> None:
    calibration = [t.read() for t in calibration_texts()]
    assert shared_piece(text.read(), calibration) is None


def test_every_domain_has_a_calibration_and_a_heldout_text() -> None:
    assert set(EVAL_DOMAINS) == {"fiction", "encyclopedic", "code"}
    assert {t.domain for t in calibration_texts()} >= set(EVAL_DOMAINS)
    for name in shipped_names():
        text, description = read_text(name)
        assert len(text) > 50_000 and description.startswith(f"{name}: ")
    assert read_text("default-heldout")[0] == read_text("heldout-fiction")[0]
