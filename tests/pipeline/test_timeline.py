"""The timeline picture is written (matplotlib is the optional "bench" extra)."""
import pytest

from dsv3.parallel.pipeline import Costs, build_schedule, simulate


def test_timeline_png_is_written(tmp_path):
    pytest.importorskip("matplotlib", reason="optional: pip install 'dsv3[bench]'")
    from dsv3.parallel.pipeline.timeline import draw_timeline
    res = simulate(build_schedule("dualpipe", 4, 8), Costs(F=1, B=2, W=1, FB=2.5))
    path = draw_timeline(res, tmp_path / "sub" / "dualpipe.png", "DualPipe pp=4")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
