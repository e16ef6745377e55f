"""Shared test configuration: KVM-marked tests skip, with the reason, where /dev/kvm does not work."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason: str | None = None
    checked = False
    for item in items:
        if item.get_closest_marker("kvm") is None:
            continue
        if not checked:
            from livemig.guest import kvm_unavailable

            reason = kvm_unavailable()
            checked = True
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"KVM not usable here: {reason}"))
