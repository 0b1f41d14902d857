"""Progress in a log file: whole lines with rate and time left, never a redrawn bar."""

import io

from pipeline.progress import LogLines


def test_log_lines_are_whole_lines_with_rate_and_eta():
    out = io.StringIO()
    with LogLines(total=300, desc="labeling", unit="row", file=out, mininterval=0, miniters=1,
                  bar_format="{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%), {rate_fmt}, {remaining} left") as bar:
        for _ in range(3):
            bar.update(100)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[-1].startswith("labeling: 300/300 (100%)") and "row/s" in lines[-1] and "left" in lines[-1]
    assert any(line.startswith("labeling: 100/300") for line in lines)
