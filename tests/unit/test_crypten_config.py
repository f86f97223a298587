"""CrypTen's config with cached reads: same values as OmegaConf, overrides and writes honoured."""

from __future__ import annotations

import threading

from protocols.mpc.cryptenlib import config_cache as crypten_config
from protocols.mpc.cryptenlib import crypten


def test_cached_reads_match_omegaconf_and_follow_overrides_and_writes() -> None:
    base = type(crypten.cfg)
    crypten_config.use_cached_reads()
    try:
        cfg = crypten.cfg
        assert type(cfg) is crypten_config.CachedConfig
        raw = cfg.config
        assert cfg.encoder.precision_bits == raw.encoder.precision_bits
        assert cfg["functions.exp_iterations"] == raw.functions.exp_iterations
        assert cfg.debug.validation_mode is False
        iterations = cfg.functions.exp_iterations
        with cfg.temp_override({"functions.exp_iterations": iterations + 3}):
            assert cfg.functions.exp_iterations == iterations + 3
        assert cfg.functions.exp_iterations == iterations
        verbose = cfg.communicator.verbose
        cfg.communicator.verbose = not verbose
        try:
            assert cfg.communicator.verbose is (not verbose)
            assert cfg.config.communicator.verbose is (not verbose)
        finally:
            cfg.communicator.verbose = verbose
        assert cfg.communicator.verbose is verbose
    finally:
        crypten_config.release()
    assert type(crypten.cfg) is base


def test_thread_local_overrides_do_not_leak_between_threads() -> None:
    seen: dict[str, int] = {}
    entered, leave = threading.Event(), threading.Event()

    def overriding() -> None:
        with crypten.cfg.temp_override({"functions.exp_iterations": 99}):
            seen["inside"] = crypten.cfg.functions.exp_iterations
            entered.set()
            leave.wait(10)

    with crypten_config.parties_as_threads():
        before = crypten.cfg.functions.exp_iterations
        thread = threading.Thread(target=overriding)
        thread.start()
        assert entered.wait(10)
        seen["other thread"] = crypten.cfg.functions.exp_iterations
        leave.set()
        thread.join(10)
    assert seen == {"inside": 99, "other thread": before}


def test_writes_made_while_uncached_are_seen_after_switching_back() -> None:
    with crypten_config.parties_as_threads():
        verbose = crypten.cfg.communicator.verbose  # cached
    crypten.cfg.communicator.verbose = not verbose  # plain class: straight to OmegaConf
    try:
        with crypten_config.parties_as_threads():
            assert crypten.cfg.communicator.verbose is (not verbose)
            assert crypten.cfg["communicator.verbose"] is (not verbose)
    finally:
        crypten.cfg.communicator.verbose = verbose
