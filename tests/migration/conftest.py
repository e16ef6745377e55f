"""Every Destination a test made is cancelled at its end: one still waiting for a source (it waits
without a time limit, as QEMU's -incoming) would otherwise keep pytest from exiting."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from livemig.migration.destination import Destination


@pytest.fixture(autouse=True)
def _end_waiting_destinations(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    made: list[Destination] = []
    init = Destination.__init__

    def tracked(self: Destination, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Destination, "__init__", tracked)
    yield
    for d in made:
        d.cancel("test over")
