"""Private generation on in-memory channels (client, server, dealer as threads) and the
KV-stationary products, checked against plaintext."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from models.kv_pruning import PolicyError, cluster_score_bound
from models.registry import InputError, load_model
from privinf.ledger.counting import Ledger
from protocols.kv.generate import plain_greedy
from protocols.kv.stationary import StationaryDealer, StationaryError, StationaryParty
from protocols.mpc.compare_widths import bits_for
from protocols.mpc.cryptenlib import crypten, crypten_session, parties_as_threads
from protocols.mpc.csprng import new_seed
from protocols.mpc.vocabulary import MSG_END, TAG_MSG
from protocols.net.channels import memory_pair, run_parties
from protocols.routes.local_run import run_local_session
from protocols.routes.mpc import MpcClient, MpcInputError, MpcServer

PROMPT = "private generation on shares, a KV cache in MPC"  # 48 bytes = 48 tokens (gpt2-tiny)


# ----- KV-stationary products --------------------------------------------------------------
def _stationary_parties(body: Callable[[StationaryParty, Ledger], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``body(party, ledger)`` on two CrypTen parties with KV-stationary parties and a dealer."""
    seeds = {0: new_seed(), 1: new_seed()}
    p0, p1 = memory_pair("client", "server", timeout_s=60)
    d0, dd = memory_pair("client", "dealer", timeout_s=60)
    dealer = StationaryDealer(seeds)

    def party(rank: int) -> dict[str, Any]:
        peer = p0 if rank == 0 else p1
        ledger = Ledger(peer.local)
        peer.ledger = ledger
        kvs = StationaryParty(rank, seeds[rank], peer, d0 if rank == 0 else None, ledger)
        with crypten_session(peer, rank, ledger, randomness="crypten"):
            result = body(kvs, ledger)
        if rank == 0:
            d0.send_json(TAG_MSG, {"type": MSG_END})
        return result

    with parties_as_threads():  # CrypTen's reciprocal swaps its config: one per party thread
        return run_parties(lambda: party(0), lambda: party(1), lambda: dealer.serve(dd), timeout_s=120)[:2]


def _stationary_run(keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, w: torch.Tensor,
                    blocks: list[int]) -> list[dict[str, Any]]:
    def body(kvs: StationaryParty, ledger: Ledger) -> dict[str, Any]:
        k_sh, v_sh = crypten.cryptensor(keys, src=1), crypten.cryptensor(values, src=1)
        q_sh, w_sh = crypten.cryptensor(q, src=0), crypten.cryptensor(w, src=0)
        ks = vs = None
        start = 0
        for rows in blocks:
            idx = torch.arange(start, start + rows)
            ks = kvs.append(ks, 0, "k", k_sh[:, :, idx])
            vs = kvs.append(vs, 0, "v", v_sh[:, :, idx])
            start += rows
        heads = torch.arange(q.shape[1]) // (q.shape[1] // keys.shape[1])
        before = ledger.totals().bytes_sent
        scores = kvs.scores(q_sh, kvs.view(ks, 0, "k")[:, heads])
        product_bytes = ledger.totals().bytes_sent - before
        out = kvs.weighted(w_sh, kvs.view(vs, 0, "v")[:, heads])
        return {"scores": scores.get_plain_text(), "out": out.get_plain_text(),
                "bytes": product_bytes, "opened": kvs.opened_rows}

    return _stationary_parties(body)


def test_stationary_products_match_plaintext() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(1, 2, 7, 8, generator=gen), torch.randn(1, 2, 7, 8, generator=gen)
    q, w = torch.randn(1, 4, 1, 8, generator=gen), torch.rand(1, 4, 1, 7, generator=gen)
    out0, out1 = _stationary_run(keys, values, q, w, blocks=[5, 1, 1])
    expand = torch.arange(4) // 2
    want_scores = q @ keys[:, expand].transpose(-2, -1)
    want_out = w @ values[:, expand]
    for out in (out0, out1):
        assert (out["scores"] - want_scores).abs().max() < 1e-3
        assert (out["out"] - want_out).abs().max() < 1e-3
        assert out["opened"] == 14  # 7 K rows + 7 V rows, each opened exactly once
    # a product opens only q - A: 4 heads x 8 elements x 8 bytes (+ frame overhead), not K
    assert 4 * 8 * 8 <= out0["bytes"] < 4 * 8 * 8 + 400


def test_selection_is_opened_once_then_gathers_and_scatters() -> None:
    """mpcache's one-hot S (kind ``s``, stored as S^T): opened masked once, then ``S @ m`` and
    ``S^T @ p`` twice each (two layers sharing it) open only ``m`` and ``p``."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(5)
    chosen = torch.tensor([[[1, 3], [0, 2]]])  # [B, kv_heads, k]: clusters picked per kv head
    onehot = torch.nn.functional.one_hot(chosen, 4).float()  # S [1, 2, 2, 4]
    mid, picked = torch.randn(1, 4, 4, 3, generator=gen), torch.randn(1, 4, 2, 3, generator=gen)
    heads = torch.arange(4) // 2

    def body(kvs: StationaryParty, ledger: Ledger) -> dict[str, Any]:
        s_sh = crypten.cryptensor(onehot, src=1)
        m_sh, p_sh = crypten.cryptensor(mid, src=0), crypten.cryptensor(picked, src=0)
        before = ledger.totals().bytes_sent
        view = kvs.view(kvs.new_store(0, "s", s_sh.transpose(-2, -1)), 0, "s")[:, heads]
        opened_s = ledger.totals().bytes_sent - before
        products, sent = [], []
        for _ in range(2):
            before = ledger.totals().bytes_sent
            products.append((kvs.weighted(m_sh.transpose(-2, -1), view).transpose(-2, -1),
                             kvs.scores(p_sh.transpose(-2, -1), view).transpose(-2, -1)))
            sent.append(ledger.totals().bytes_sent - before)
        return {"opened_s": opened_s, "bytes": sent, "opened_rows": kvs.opened_rows,
                "gather": [g.get_plain_text() for g, _ in products],
                "scatter": [s.get_plain_text() for _, s in products]}

    out0, out1 = _stationary_parties(body)
    s = onehot[:, heads]
    for out in (out0, out1):
        for gathered, scattered in zip(out["gather"], out["scatter"]):
            assert (gathered - s @ mid).abs().max() < 1e-3
            assert (scattered - s.transpose(-2, -1) @ picked).abs().max() < 1e-3
        assert out["opened_rows"] == 0  # S is not cache: no K/V rows, no kv_cache storage
    assert 2 * 4 * 2 * 8 <= out0["opened_s"] < 2 * 4 * 2 * 8 + 400  # S^T once: 2 kv heads x 4 x 2
    for sent in out0["bytes"]:  # m^T - A (4 heads x 3 x 4) and p^T - A (4 x 3 x 2), not S
        assert (4 * 3 * 4 + 4 * 3 * 2) * 8 <= sent < (4 * 3 * 4 + 4 * 3 * 2) * 8 + 400


def test_dealer_refuses_a_product_label_twice() -> None:
    dealer = StationaryDealer({0: new_seed(), 1: new_seed()})
    msg = {"type": "kvs_triple", "op": "qk", "kind": "k", "layer": 0, "index": 0, "a_shape": [1, 2, 1, 4],
           "lead": [1, 2], "dim": 4, "heads": [0, 1], "blocks": [[0, 3]]}
    assert tuple(dealer.correction(msg).shape) == (1, 2, 1, 3)
    with pytest.raises(StationaryError, match="twice"):
        dealer.correction(msg)
    with pytest.raises(StationaryError, match="bad kvs_triple"):
        dealer.correction(dict(msg, index=1, op="kv"))


# ----- generation end to end -----------------------------------------------------------------
def _run_generation(calls: list[dict[str, Any]], model: str = "gpt2-tiny") -> tuple[list[Any], MpcServer]:
    def work(client: MpcClient) -> list[Any]:
        results = []
        for call in calls:
            output, rows = client.generate(PROMPT, **call)
            results.append((output, rows, client.last_cache))
        return results

    session = run_local_session(model, "exact", work, timeout_s=300)
    return session.result, session.server


@pytest.fixture(scope="module")
def generations() -> Any:
    calls = [
        {"max_new_tokens": 4},
        {"max_new_tokens": 3, "policy": "window", "budget": 0.5},
        {"max_new_tokens": 3, "policy": "static", "budget": 16, "options": {"window": 8}},
        {"max_new_tokens": 4, "policy": "mpcache", "budget": 0.5,
         "options": {"cluster": 4, "static": 2.0, "window": 8}},
    ]
    calls.append(dict(calls[-1]))  # the same generation again: its steps' material is preprocessed
    results, server = _run_generation(calls)
    return calls, results, server.last_cache  # the server's cache of the last call (mpcache)


@pytest.mark.parametrize("which", [0, 1, 2, 3], ids=["none", "window", "static", "mpcache"])
def test_generation_matches_plaintext_policy(generations: Any, which: int) -> None:
    calls, results, _ = generations
    call = calls[which]
    output, rows, cache = results[which]
    bundle = load_model("gpt2-tiny", "exact")
    want, margins, chosen = plain_greedy(bundle.model, bundle.encode(PROMPT), call["max_new_tokens"],
                                         call.get("policy", "none"), call.get("budget"), call.get("options"))
    assert min(margins) > 1e-2  # a fixed-point tie would make the comparison meaningless
    assert output["token_ids"] == want
    assert output["text"] == bytes(want).decode("utf-8", errors="replace")
    client_rows, server_rows, _ = rows
    steps = {r.step for r in client_rows}
    assert {"prefill"} | {f"decode.{i}" for i in range(call["max_new_tokens"] - 1)} <= steps
    stored = sum(r.counters.storage.get("kv_cache", 0) for r in server_rows)
    assert stored > 0


def test_decode_steps_precomputed_in_batches_give_the_plaintext_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    from protocols.mpc.secure_linear import SecureLinearClient
    from protocols.routes import mpc_party

    monkeypatch.setattr(mpc_party, "PRECOMPUTED_STEPS", 2)  # 4 decode steps: batches of 2 and 2
    batches: list[tuple[int, int]] = []
    real = SecureLinearClient.precompute

    def precompute(self: SecureLinearClient, x_shape: tuple[int, ...], inferences: int = 1) -> None:
        if self.name == "lm_head":
            batches.append((x_shape[1], inferences))
        real(self, x_shape, inferences)

    monkeypatch.setattr(SecureLinearClient, "precompute", precompute)
    session = run_local_session("gpt2-tiny", "exact", lambda client: client.generate(PROMPT, max_new_tokens=5)[0],
                                timeout_s=300)
    bundle = load_model("gpt2-tiny", "exact")
    want, margins, _ = plain_greedy(bundle.model, bundle.encode(PROMPT), 5, "none", None, None)
    assert min(margins) > 1e-2 and session.result["token_ids"] == want
    assert batches == [(len(PROMPT), 1), (1, 2), (1, 2)]  # the prefill, then two batches of two steps
    assert all(not m.precomputed() for m in session.client.model.modules() if isinstance(m, SecureLinearClient))


def test_mpcache_choice_on_shares_equals_plaintext_choice(generations: Any) -> None:
    """The cluster choice made on shares (opened here with both parties' shares) is the top-k of
    the cluster scores; it equals the plaintext model's choice for every head whose k-th and
    (k+1)-th scores are not a near-tie. The fixture's mpcache keeps the whole prompt in its static
    phase (static 2 x budget 0.5), so no eviction near-tie can make shares and plaintext keep
    different tokens: the scores agree within fixed-point noise (~3e-3) in every head. The
    static eviction on shares is checked by the `static` generation and by test_kv_select."""
    calls, results, server_cache = generations
    call = calls[-1]
    client_cache = results[-1][2]
    bundle = load_model("gpt2-tiny", "exact")
    _, _, chosen = plain_greedy(bundle.model, bundle.encode(PROMPT), call["max_new_tokens"], "mpcache",
                                call["budget"], call["options"])
    assert len(client_cache.selections) == len(server_cache.selections) == len(chosen) > 0
    clear = 0
    for (_, sim0, s0), (_, sim1, s1), (plain_sim, ref) in zip(client_cache.selections, server_cache.selections,
                                                               chosen):
        onehot = (s0.share + s1.share).double() / 2**16
        sim = (sim0.share + sim1.share).double() / 2**16
        assert ((onehot - onehot.round()).abs() < 1e-3).all()
        got = onehot.round().argmax(-1).sort(-1).values  # rows come in rank order
        k = got.shape[-1]
        assert torch.equal(got, sim.topk(k, dim=-1).indices.sort(-1).values)
        top = sim.sort(-1, descending=True).values
        for head in range(got.shape[1]):
            assert (sim[0, head] - plain_sim[0, head]).abs().max() < 5e-3  # fixed-point noise ~3e-3
            if top[0, head, k - 1] - top[0, head, k] > 1e-2:  # no near-tie within the noise
                assert torch.equal(got[0, head], ref[0, head])
                clear += 1
    assert clear >= 3  # 4 of the 12 (selection, head) pairs have a gap above 1e-2
    # every rank comparison ran under the softmax's promise on each score (16-dim heads, one query
    # row: 35 bits instead of the default 40)
    width = bits_for(cluster_score_bound(bundle.config.hidden // bundle.config.heads, 1), 40, 16)
    ranked = sum(sim.shape[1] * sim.shape[-1] * (sim.shape[-1] - 1) // 2 for _, sim, _ in client_cache.selections)
    extra: dict[str, float] = {}
    for row in results[-1][1][0]:
        for key, value in row.counters.extra.items():
            extra[key] = extra.get(key, 0.0) + value
    assert width == 35 and ranked > 0
    assert extra.get(f"fss_keys_{width}b_shift0", 0) + extra.get(f"fss_bitkeys_{width}b_shift0", 0) == ranked


def test_a_repeated_generation_preprocesses_every_step(generations: Any) -> None:
    """The second run of the same public generation fetches each step's dealer material in one
    offline batch before the step (recorded the first time): same tokens, no dealer round trip
    left on the online path."""
    calls, results, _ = generations
    assert calls[-1] == calls[-2]
    (first, first_rows, _), (again, again_rows, _) = results[-2], results[-1]
    assert again["token_ids"] == first["token_ids"]
    steps = ["prefill"] + [f"decode.{i}" for i in range(calls[-1]["max_new_tokens"] - 1)]

    def per_step(rows: list[Any], phase: str) -> dict[str, tuple[int, int]]:
        out = {step: [0, 0] for step in steps}
        for row in rows:
            if row.step in out and row.phase.value == phase:
                out[row.step][0] += row.counters.rounds
                stored = row.counters.storage  # preprocessed dealer material, charged to its layers
                out[row.step][1] += stored.get("triples", 0) + stored.get("comparison keys", 0)
        return {k: (v[0], v[1]) for k, v in out.items()}

    first_online, again_online = per_step(first_rows[0], "online"), per_step(again_rows[0], "online")
    first_offline, again_offline = per_step(first_rows[0], "offline"), per_step(again_rows[0], "offline")
    for step in steps:
        assert first_offline[step][1] == 0 < again_offline[step][1]
        assert again_online[step][0] < first_online[step][0] * 0.7  # the dealer round trips are gone
        assert again_online[step][0] > 0


def test_bad_generation_input_raises_before_sending() -> None:
    errors: dict[str, Exception] = {}

    def work(client: MpcClient) -> None:
        cases = {
            "too_long": dict(prompt="x" * 65, max_new_tokens=1),
            "too_long_total": dict(prompt="x" * 60, max_new_tokens=8),
            "budget": dict(prompt="hello", max_new_tokens=2, policy="window", budget=0),
            "fraction": dict(prompt="hello", max_new_tokens=2, policy="static", budget=1.5),
            "policy": dict(prompt="hello", max_new_tokens=2, policy="lru", budget=0.5),
            "tokens": dict(prompt="hello", max_new_tokens=0),
        }
        for name, kwargs in cases.items():
            try:
                client.generate(**kwargs)
            except ValueError as exc:
                errors[name] = exc

    run_local_session("gpt2-tiny", "exact", work, timeout_s=120)
    assert isinstance(errors["too_long"], InputError) and "limit is 64" in str(errors["too_long"])
    assert isinstance(errors["too_long_total"], MpcInputError) and "context of 64" in str(errors["too_long_total"])
    assert isinstance(errors["budget"], PolicyError) and "budget must be > 0" in str(errors["budget"])
    assert isinstance(errors["fraction"], PolicyError) and "(0, 1]" in str(errors["fraction"])
    assert isinstance(errors["policy"], PolicyError) and "unknown KV policy 'lru'" in str(errors["policy"])
    assert isinstance(errors["tokens"], MpcInputError) and "max_new_tokens" in str(errors["tokens"])
    for exc in errors.values():
        assert len(str(exc).splitlines()) == 1
