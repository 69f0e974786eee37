"""Command line, config composition, launch modes, discovery and supervision."""
