"""Defaults live in conf/: where a library function must have defaults of its own (it is
usable without Hydra), they agree with the configuration the stages run with."""
from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from pipeline.execution.scheduler import UnitScheduler
from pipeline.execution.worker import UnitWorker
from pipeline.inputs.images import READ_LIMITS, prepare_image


def defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.fixture
def fully_auto(compose_config):
    return OmegaConf.to_container(compose_config("+stage=fully_auto", "output=/x").stage, resolve=True)


def test_image_decoding_defaults_are_the_configs(fully_auto):
    library = defaults(prepare_image)
    image = fully_auto["image"]
    for name, value in library.items():
        if name == "privacy":
            continue  # None: the step off, as conf/privacy/default.yaml's blur: false
        assert image[name] == value, (
            f"prepare_image({name}={value!r}) but conf/image/default.yaml has {image[name]!r}")
    assert fully_auto["privacy"]["blur"] is False
    assert set(image) == set(library) | set(READ_LIMITS), "an image setting is neither an argument nor a read limit"


def test_scheduler_and_worker_defaults_are_the_configs(fully_auto):
    for name, value in defaults(UnitScheduler.__init__).items():
        if name in fully_auto:
            assert fully_auto[name] == value, (
                f"UnitScheduler({name}={value!r}) but fully_auto.yaml has {fully_auto[name]!r}")
    assert defaults(UnitWorker.__init__)["prefetch"] == fully_auto["prefetch"]
