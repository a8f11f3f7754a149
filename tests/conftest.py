from __future__ import annotations

from pathlib import Path

import pytest

from extproc.core import Gateway
from extproc.policy import load_policy

POLICIES = Path(__file__).parent / "policies"


@pytest.fixture(scope="session")
def gateway_policy_path() -> Path:
    return POLICIES / "gateway.yaml"


@pytest.fixture(scope="session")
def gateway(gateway_policy_path: Path) -> Gateway:
    return Gateway.from_policy(load_policy(gateway_policy_path))
