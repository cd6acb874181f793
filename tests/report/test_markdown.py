from tuneforge.report.markdown import Document, inline_html


def test_markdown_and_html_render_the_same_blocks(tmp_path):
    png = tmp_path / "plots" / "a.png"
    png.parent.mkdir()
    png.write_bytes(b"\x89PNG")
    doc = Document("Title <x>", base=tmp_path)
    doc.heading("Section").paragraph("Some **bold** and `code` <tag>").bullets(["one", "two"])
    doc.table(["a", "b|c"], [[1, "x|y"]]).image(png, "alt").image(tmp_path / "missing.png", "gone")
    doc.verdict("holds", "because").code("x = 1")
    md = doc.to_markdown()
    assert md.startswith("# Title <x>\n") and "## Section" in md and "- two" in md
    assert "| a | b\\|c |" in md and "![alt](plots/a.png)" in md and "missing" not in md
    assert "**Verdict: holds.** because" in md and "```\nx = 1\n```" in md
    html = doc.to_html()
    assert "<strong>bold</strong>" in html and "<code>code</code>" in html and "&lt;tag&gt;" in html
    assert '<img src="plots/a.png"' in html and "verdict-holds" in html and "<th>b|c</th>" in html
    md_path, html_path = doc.write(tmp_path / "r.md")
    assert md_path.read_text() == md and html_path.read_text() == html


def test_inline_html_escapes():
    assert inline_html("a < b **c & d**") == "a &lt; b <strong>c &amp; d</strong>"
