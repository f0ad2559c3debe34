"""tokenmill on Ray Serve (docs/deploy.md): `tokenmill serve --ray`, or
`serve run tokenmill.ray:build_app` / a Serve config file with that import path.

Needs the `ray` extra: pip install 'tokenmill[ray]'. Importing this package does not import
Ray; `build_app` does.
"""

from __future__ import annotations

from typing import Any


def build_app(args: dict[str, Any] | None = None):
    from tokenmill.ray.app import build_app as build

    return build(args)
