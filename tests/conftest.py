"""Fixtures several test files share."""

from __future__ import annotations

import socket

import pytest


def refuse(monkeypatch, calls: list, owner, name: str, label: str) -> None:
    """Replace owner.name with a call that records itself in `calls` and raises AssertionError."""
    def call(*args, **kwargs):
        calls.append((label, args))
        raise AssertionError(f"{label}{args} called: the URL was not refused before any I/O")

    monkeypatch.setattr(owner, name, call)


@pytest.fixture
def no_lookups(monkeypatch):
    """Every name lookup and connection recorded and refused: a test that reaches for the network
    fails here instead of leaving loopback. Returns the calls."""
    calls: list = []
    for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
        refuse(monkeypatch, calls, socket, name, f"socket.{name}")
    return calls
