"""Package-level rules: curated exports, one hash tag per queue, Lua contracts, no pickle."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import qflow
from qflow._broker.keys import QueueKeys, check_queue_name
from qflow._broker.scripts import SCRIPT_NAMES, load_source

PKG = Path(qflow.__file__).parent


def test_exported_members_are_exactly_all() -> None:
    """``qflow.__all__`` lists every public name the package exposes, each with a docstring."""
    public = {name for name in dir(qflow) if not name.startswith("_")}
    public -= {"exceptions", "testing"}  # submodules, public by name
    assert set(qflow.__all__) == public
    for name in qflow.__all__:
        assert getattr(qflow, name).__doc__, name


def test_every_key_of_a_queue_shares_one_hash_tag() -> None:
    """All keys of a queue carry ``{queue}``, so each script touches one Redis Cluster slot."""
    k = QueueKeys("qflow", "email")
    keys = [*k.all_fixed(), k.notify("abc")]
    assert all(re.fullmatch(r"qflow:\{email\}:[a-z:]+(abc)?", key) for key in keys), keys
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("bad", ["", "a{b}", "with space", "x" * 129, "é"])
def test_queue_names_that_break_the_hash_tag_are_refused(bad: str) -> None:
    """Queue names with braces, spaces or non-ASCII characters raise a clear error."""
    with pytest.raises(ValueError, match="invalid queue name"):
        check_queue_name(bad)
    with pytest.raises(qflow.ConfigurationError):
        qflow.App("redis://x").queue(bad)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_each_script_states_its_contract_and_uses_keys_only(name: str) -> None:
    """Every Lua script documents KEYS/ARGV/returns and never builds a key name from a string."""
    source = (PKG / "_broker" / "lua" / f"{name}.lua").read_text()
    head = source.split("\n\n", 1)[0]
    assert "KEYS[1]" in head
    assert "ARGV[" in head
    assert "Returns:" in head
    body = load_source(name)
    # A key built inside a script would concatenate onto a prefix: no `..` may feed a redis.call key slot.
    assert not re.search(r"redis\.call\('[A-Z]+',\s*[^K,)][^,)]*\.\.", body)


def test_no_pickle_or_eval_in_the_package() -> None:
    """qflow never unpickles or evals: payloads are msgspec only."""
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        assert "eval(" not in text.replace("EVAL", ""), path
