"""An HTML template for ``dvc plots show`` / ``dvc plots diff`` that renders with no network.

DVC's default page loads Vega, Vega-Lite and Vega-Embed from a CDN (its
``{scripts}`` placeholder): offline the page stays blank. This template leaves
``{scripts}`` out and inlines the three libraries from the JavaScript bundle
that the ``vl-convert-python`` package ships (``vl_convert.javascript_bundle``).

DVC's plot divs call ``vegaEmbed('#id', spec)`` in classic inline scripts while
the page is parsed; the bundle is an ES module, and modules run only after
parsing. So a classic script in <head> queues those calls and the module
replays them once the real ``vegaEmbed`` exists. A Content-Security-Policy
forbids every network request, so a page that would reach for a CDN fails
visibly instead of silently depending on one.

Run ``python -m pipeline.plotpage`` (``.ci/setup`` does) to write the template
that ``.dvc/config`` (``plots.html_template``) points to.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.atomic import atomic_file
from pipeline.cli import run_stage
from pipeline.errors import PipelineError

DEFAULT_OUT = Path(".dvc/vega-offline.html")  # .dvc/config: plots.html_template = vega-offline.html
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # DVC replaces these in the template

# Runs inside the bundle's module, where vegaEmbed / vega / vegaLite are in scope.
_SNIPPET = """
window.vega = vega; window.vegaLite = vegaLite; window.vegaEmbed = vegaEmbed;
for (const [el, spec, opts] of window.dvcPlotQueue.splice(0)) {
  vegaEmbed(el, spec, opts).catch((err) => {
    document.querySelector(el).textContent = "vega-embed failed: " + err;
  });
}
"""

_PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <meta http-equiv="Content-Security-Policy"
          content="default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; img-src 'self' data: blob:">
    {refresh_tag}
    <title>DVC Plot</title>
    <script>
        window.dvcPlotQueue = [];
        window.vegaEmbed = (el, spec, opts) => { window.dvcPlotQueue.push([el, spec, opts]); };
    </script>
    <script type="module">
@BUNDLE@
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


class PlotPageError(PipelineError):
    """The offline plots template could not be built."""


def build_template(bundle: str) -> str:
    """The page template around ``bundle`` (JavaScript that ends by running the queue snippet)."""
    if "</script" in bundle.lower():
        raise PlotPageError(
            "the JavaScript bundle contains '</script', which would end the inline <script> early"
        )
    inside = [p for p in PLACEHOLDERS if p in bundle]
    if inside:
        raise PlotPageError(f"the JavaScript bundle contains {inside}, which DVC would replace")
    return _PAGE.replace("@BUNDLE@", bundle)


def javascript_bundle() -> str:
    """Vega, Vega-Lite and Vega-Embed with the replay snippet, from vl-convert-python (no network)."""
    try:
        import vl_convert
    except ImportError:
        raise PlotPageError(
            'vl-convert-python is not installed: pip install -e ".[plots]" (or run bash .ci/setup)'
        ) from None
    return vl_convert.javascript_bundle(_SNIPPET)


def write_template(out: Path) -> int:
    """Write the template atomically; returns its size in bytes."""
    page = build_template(javascript_bundle()).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        tmp.write_bytes(page)
    return len(page)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"template file (default: {DEFAULT_OUT})")
    args = p.parse_args(argv)
    size = write_template(args.out)
    print(f"plots template: {args.out} ({size} bytes; Vega, Vega-Lite, Vega-Embed inlined)")


if __name__ == "__main__":
    run_stage(main)
