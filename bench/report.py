"""Writes one benchmark's block into BENCHMARKS.md, between its markers."""

import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_block(begin, end, lines, heading):
    """Replaces the text between `begin` and `end` with `lines`, or appends
    a new section `heading` holding them."""
    block = "\n".join([begin, *lines, end])
    text = BENCHMARKS.read_text()
    if begin in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## {heading}\n\n{block}\n"
    BENCHMARKS.write_text(text)
