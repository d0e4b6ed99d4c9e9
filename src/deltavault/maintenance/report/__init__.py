"""deltavault report: one self-contained HTML page (or JSON) of what the backups did.

``build.build_report`` gathers the data (``data.Report``) from snapshots, status records,
trees and the index, never pack data; ``page.render_html`` draws it (``charts``, with
matplotlib). See docs/design.md, "Reports".
"""
