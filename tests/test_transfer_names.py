"""Every place a transport is named refuses one that does not exist (shm and nixl no longer do)
with the valid names, instead of failing later inside a service."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from encode_server.settings import EncodeSettings
from language_server.settings import LanguageSettings
from splitvl.deploy.config import DeployConfig
from transfer.registry import make_receiver, make_sender, transport_names

VALID = r"choose one of \['cuda_ipc', 'zmq'\]"


@pytest.mark.parametrize("name", ["shm", "nixl", "carrier_pigeon"])
def test_dropped_or_unknown_transports_are_refused_with_the_valid_names(name: str) -> None:
    assert transport_names() == ["cuda_ipc", "zmq"]
    with pytest.raises(ValueError, match=VALID):
        make_sender(name, "tcp://127.0.0.1:1")
    with pytest.raises(ValueError, match=VALID):
        make_receiver(name, "tcp://127.0.0.1:*")
    for key in ("transport", "result_transport"):
        with pytest.raises(ValidationError, match=VALID):
            EncodeSettings(model="m", listen="tcp://127.0.0.1:5600", **{key: name})
        with pytest.raises(ValidationError, match=VALID):
            LanguageSettings(model="m", **{key: name})
        with pytest.raises(ValidationError, match=VALID):
            DeployConfig(**{key: name})


def test_the_transports_that_exist_are_accepted() -> None:
    for name in transport_names():
        assert EncodeSettings(model="m", listen="tcp://127.0.0.1:5600", transport=name).transport == name
        assert LanguageSettings(model="m", result_transport=name).result_transport == name
