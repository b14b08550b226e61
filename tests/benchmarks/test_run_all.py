"""run_all --collect gathers the rendered tables into results/ALL.md and leaves the curated RESULTS.md alone."""

from benchmarks import run_all


def test_collect_writes_all_md_in_order_and_never_results_md(tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "speed.md").write_text("## speed\n\nx1.3\n")
    (results / "hidden.md").write_text("## hidden\n\n78.66\n")
    curated = tmp_path / "RESULTS.md"
    curated.write_text("hand-written\n")
    monkeypatch.setattr(run_all, "HERE", tmp_path)  # where RESULTS.md would be, were it written

    out = run_all.collect(results)

    text = out.read_text()
    assert out == results / "ALL.md" and curated.read_text() == "hand-written\n"
    assert text.index("## speed") < text.index("## hidden")  # the core benchmarks first, then the rest by name
    assert "Not run yet: `python -m benchmarks.quality`" in text
    run_all.collect(results)  # a second collect does not swallow the first ALL.md
    assert out.read_text() == text
