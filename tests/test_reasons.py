"""The reason table: unique, stable, and documented."""

from pathlib import Path

from tapnet import reasons

DOC = Path(__file__).resolve().parents[1] / "docs" / "reasons.md"


def test_reason_numbers_are_unique():
    numbers = [r.number for r in reasons.all_reasons()]
    assert len(numbers) == len(set(numbers))


def test_reason_codes_are_unique():
    codes = [r.code for r in reasons.all_reasons()]
    assert len(codes) == len(set(codes))


def test_parser_reason_numbers_fit_uint8():
    assert max(r.number for r in reasons.all_reasons()) < 256


def test_reasons_doc_matches_table():
    assert DOC.read_text() == reasons.DOC_HEADER + reasons.markdown_table()
