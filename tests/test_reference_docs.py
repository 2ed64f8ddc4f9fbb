"""docs/reference/ is what scripts/gen_reference.py generates now, and every config key says what it means."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gen_reference.py"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """scripts/gen_reference.py as a module."""
    spec = importlib.util.spec_from_file_location("gen_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["cli.md", "config.md"])
def test_reference_page_is_current(gen: ModuleType, page: str) -> None:
    path = gen.PAGES / page
    expected = gen.render()[path]
    actual = path.read_text() if path.is_file() else ""
    assert actual == expected, f"docs/reference/{page} is out of date: run `{gen.COMMAND}`"


def test_every_config_key_has_one_comment_line(gen: ModuleType) -> None:
    problems = gen.config_problems(gen.read_configs())
    assert not problems, "config keys need exactly one comment line saying what they mean:\n" + "\n".join(problems)


def test_checker_names_a_key_without_comment(gen: ModuleType) -> None:
    text = "# A header.\n\nbatch_size: 4  # images per step\nsample:  # how samples are drawn\n  max_masks: 64\n"
    config = gen.parse_config(text, "data/tiny")
    assert config.problems == ["configs/data/tiny.yaml: sample.max_masks: no comment says what it means"]
    assert [(k.path, k.value, k.meaning) for k in config.keys] == [
        ("batch_size", "4", "images per step"),
        ("sample", "", "how samples are drawn"),
        ("sample.max_masks", "64", ""),
    ]


def test_checker_reads_comments_above_and_flags_stray_ones(gen: ModuleType) -> None:
    text = (
        "# @package _global_\n# A header.\n\ndefaults:\n  - override /model: vit_b\n\n"
        "# the run's name\nname: x\nmax_time: \"00:08:30\"  # wall-clock cap\n\n# a note about nothing\n\n"
        "lr: 1.0  # peak lr\n  # and a second line\nseed: 0\n# one line\nsteps: 1  # and another\n"
    )
    config = gen.parse_config(text, "experiment/x")
    assert config.prefix == "" and config.defaults == ["override /model: vit_b"]
    assert [(k.path, k.value, k.meaning) for k in config.keys][:2] == [
        ("name", "x", "the run's name"),
        ("max_time", '"00:08:30"', "wall-clock cap"),
    ]
    assert config.problems == [
        "configs/experiment/x.yaml:11: a comment that belongs to no key",
        "configs/experiment/x.yaml:14: a comment that belongs to no key",
        "configs/experiment/x.yaml: seed: no comment says what it means",
        "configs/experiment/x.yaml: steps: 2 comment lines, not one",
    ]
