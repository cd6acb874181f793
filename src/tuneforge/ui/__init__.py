"""A local dashboard over run directories: runs, live curves, comparisons and a side-by-side chat.

``tuneforge.ui.runs`` reads run directories (no web dependency); ``tuneforge.ui.app`` is the web app
(``pip install 'tuneforge[ui]'``); ``static/`` holds the page and the vendored uPlot (MIT, see its LICENSE).
"""
