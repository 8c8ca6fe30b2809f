"""`report.html`: one self-contained page (images inlined as data URIs, no external assets), so
it opens from an MLflow artifact view, a mail attachment or a laptop without the study dir."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from malloc_ray.report.tables import Table

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-top: 0.6em; }
table.data { border-collapse: collapse; font-size: 13px; margin: 0.6em 0; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
table.data th { background: #f3f3f3; } table.data td:first-child { text-align: left; }
p.note, p.caption { color: #555; font-size: 13px; } img { max-width: 100%; }
nav a { margin-right: 1em; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; font-size: 14px; }
dt { font-weight: 600; }
p.banner { background: #fdecea; border-left: 4px solid #d62728; padding: 0.6em 0.8em; }
"""


def img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img class="figure" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def section(anchor: str, title: str, *parts: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def tables_html(tables: list[Table]) -> str:
    return "".join(f"<h3>{html.escape(t.title)}</h3>{t.html()}" for t in tables)


def figure_html(path: Path, caption: str) -> str:
    return f'<figure>{img_tag(path, caption)}<p class="caption">{html.escape(caption)}</p></figure>'


def repro_html(info: dict, datasets: Table) -> str:
    def flat(prefix: str, value) -> list[tuple[str, str]]:
        if isinstance(value, dict):
            return [kv for k, v in value.items() for kv in flat(f"{prefix}{k}.", v)]
        return [(prefix.rstrip("."), json.dumps(value) if isinstance(value, list) else str(value))]

    shown = {k: info[k] for k in ("name", "created_at", "command", "smoke_test", "code",
                                  "versions", "hardware", "ray_cluster", "seeds", "mlflow",
                                  "protocol") if k in info}
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>"
                   for k, v in flat("", shown))
    spec = html.escape(json.dumps(info.get("spec"), indent=2))
    return (f'<dl class="repro">{rows}</dl>{tables_html([datasets])}'
            f"<details><summary>Resolved study spec</summary><pre>{spec}</pre></details>")


def render(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """sections: (anchor, title, inner html)."""
    nav = "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in sections)
    body = "".join(section(a, t, inner) for a, t, inner in sections)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{nav}</nav>"
            f"{body}</body></html>")
