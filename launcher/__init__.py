"""Command line, config composition, launch modes, discovery and supervision (docs/architecture.md)."""


def tierzero_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tierzero")
    except PackageNotFoundError:
        return "(not installed)"
