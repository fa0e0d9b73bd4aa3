"""Per-example MC seeding (issue 20): `kfac_fast.fisher.ExampleSeed` draws each output
entry's uniform from a counter-based hash of (seed, step, draw, global example index,
position), so the samples of a batch do not depend on how it is split across ranks."""
from __future__ import annotations

import pytest
import torch

from kfac_fast.fisher import ExampleSeed, _mix32, _mix32_, sampled_output_grad

LOSSES = ["cross_entropy", "bce_with_logits", "gaussian"]


def test_the_tensor_hash_is_the_host_hash():
    # reference values of lowbias32 (Wellons' hash-prospector), on the host and the device path
    values = [0, 1, 2, 123456789, 2 ** 31, 2 ** 32 - 1]
    host = [_mix32(v) for v in values]
    assert host[:2] == [0, 1753845952]
    assert _mix32_(torch.tensor(values, dtype=torch.int64)).tolist() == host
    assert all(0 <= h < 2 ** 32 for h in host) and len(set(host)) == len(host)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("cut", [1, 3, 7])
def test_split_batch_samples_what_the_whole_batch_samples(loss, cut):
    torch.manual_seed(0)
    z = torch.randn(8, 2, 5, dtype=torch.float64)
    seed = ExampleSeed(seed=2 ** 40 + 17, step=5)
    whole = sampled_output_grad(z, loss, seed=seed)
    first = sampled_output_grad(z[:cut], loss, seed=seed)
    rest = sampled_output_grad(z[cut:], loss, seed=ExampleSeed(seed=2 ** 40 + 17, step=5, offset=cut))
    assert torch.equal(torch.cat([first, rest]), whole)
    # an unsplit batch at offset 0 is not a shifted one: the offset moves the samples
    shifted = sampled_output_grad(z[cut:], loss, seed=seed)
    assert not torch.equal(shifted, whole[cut:])


@pytest.mark.parametrize("field", ["seed", "step", "draw"])
def test_each_key_changes_the_samples(field):
    z = torch.zeros(64, 10, dtype=torch.float64)
    base = ExampleSeed(seed=3, step=4, draw=0)
    other = ExampleSeed(**{**base.__dict__, field: getattr(base, field) + 1})
    assert not torch.equal(sampled_output_grad(z, seed=base), sampled_output_grad(z, seed=other))
    assert torch.equal(sampled_output_grad(z, seed=base), sampled_output_grad(z, seed=ExampleSeed(3, 4)))
    assert base.nth(2) == ExampleSeed(3, 4, draw=2)


def test_uniforms_are_open_and_uniform():
    u = ExampleSeed(seed=11, step=2).uniform((2000, 50), torch.device("cpu"))
    assert u.dtype == torch.float32 and u.min() > 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 3e-3 and abs(u.var().item() - 1 / 12) < 2e-3
    # neighbouring entries are uncorrelated, along examples and along positions
    for a, b in ((u[:-1], u[1:]), (u[:, :-1], u[:, 1:])):
        r = torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1]
        assert abs(r.item()) < 0.01


def test_samples_follow_the_predictive_distributions():
    seed = ExampleSeed(seed=5, step=1)
    logits = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64).repeat(40000, 1)
    y = (sampled_output_grad(logits, seed=seed) < 0).double().argmax(-1)
    freq = torch.bincount(y, minlength=3).double() / len(y)
    assert torch.allclose(freq, torch.softmax(logits[0], 0), atol=0.01)
    p = torch.sigmoid(torch.full((40000, 1), 0.7, dtype=torch.float64))
    bern = p - sampled_output_grad(torch.full((40000, 1), 0.7, dtype=torch.float64), "bce_with_logits", seed=seed)
    assert abs(bern.mean().item() - p[0].item()) < 0.01
    eps = -sampled_output_grad(torch.zeros(40000, 2, dtype=torch.float64), "gaussian", seed=seed, variance=4.0) * 2
    assert abs(eps.mean().item()) < 0.02 and abs(eps.var().item() - 1.0) < 0.03


def test_seed_arguments_are_checked():
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="generator or seed"):
        sampled_output_grad(z, seed=ExampleSeed(1), generator=torch.Generator())
    with pytest.raises(TypeError, match="seed"):
        sampled_output_grad(z, seed=1)
    for bad in (dict(seed=-1), dict(seed=1, step=1.5), dict(seed=True), dict(seed=1, offset=2 ** 64)):
        with pytest.raises(ValueError, match="ExampleSeed"):
            ExampleSeed(**bad)
    with pytest.raises(ValueError, match="2\\^32 examples"):
        ExampleSeed(1, offset=2 ** 32).uniform((1, 1), torch.device("cpu"))


def test_zero_dim_and_half_outputs():
    seed = ExampleSeed(seed=9)
    g = sampled_output_grad(torch.tensor(0.3), "bce_with_logits", seed=seed)
    assert g.shape == () and torch.isfinite(g)
    h = sampled_output_grad(torch.randn(4, 6).half(), "cross_entropy", seed=seed)
    assert h.dtype == torch.float16 and torch.isfinite(h).all()


def test_sample_fisher_takes_the_per_example_seed():
    from kfac_fast import KFACPreconditioner
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    precond = KFACPreconditioner(model, fisher="mc", kl_clip=None, factor_dtype=torch.float64)
    seed = ExampleSeed(seed=21, step=2, offset=10)
    out = model(x)
    precond.sample_fisher(out, "cross_entropy", num_samples=2, seed=seed)
    out.sum().backward()
    precond.step()
    grads = [sampled_output_grad(out, "cross_entropy", seed=seed.nth(i)) for i in range(2)]
    assert not torch.equal(grads[0], grads[1])
    g = sum(d.T @ d for d in grads) / (2 * 6)
    torch.testing.assert_close(precond.layers["2"].g_factor, g, rtol=1e-12, atol=1e-14)


def test_kfac_draws_its_seed_once_and_checkpoints_it():
    from kfac_fast import KFAC
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    a = KFAC(model, generator=torch.Generator().manual_seed(5))
    b = KFAC(model, generator=torch.Generator().manual_seed(5))
    c = KFAC(model, generator=torch.Generator().manual_seed(6))
    assert a.mc_seed == b.mc_seed != c.mc_seed
    state = a.synced_state_dict()  # single-process: state_dict()
    assert state["mc_seed"] == a.state_dict()["mc_seed"] == a.mc_seed
    c.load_state_dict(state)
    assert c.mc_seed == a.mc_seed
    with pytest.raises(ValueError, match="mc_seed"):
        c.load_state_dict(dict(state, mc_seed=-3))
    old = dict(state)
    del old["mc_seed"]  # a state from before the seed existed keeps the optimiser's own
    b.load_state_dict(old)
    assert b.mc_seed == a.mc_seed


def _unchunked_uniform(s: ExampleSeed, shape: tuple, stream: int = 0) -> torch.Tensor:
    """ExampleSeed.uniform before it hashed in blocks (the whole (n, per) grid at once),
    kept verbatim as the oracle: the blocks must not change a single value."""
    import math

    from kfac_fast.fisher import _GOLDEN, _M32
    n, per = shape[0], math.prod(shape[1:])
    key = s._key(stream)
    examples = _mix32_(torch.arange(s.offset, s.offset + n, dtype=torch.int64) ^ key)
    positions = _mix32_(torch.arange(per, dtype=torch.int64).add_(_GOLDEN).bitwise_and_(_M32))
    h = _mix32_(examples[:, None] ^ positions[None, :])
    return (((h >> 9).to(torch.float32) * 2.0 + 1.0) * 2.0 ** -24).reshape(shape)


@pytest.mark.parametrize("chunk", [1, 16, 64, 500, 2 ** 24])
@pytest.mark.parametrize("shape", [(9, 5, 7), (3, 200), (11, 1)])
def test_blocked_hash_equals_the_whole_grid_bit_for_bit(monkeypatch, chunk, shape):
    import kfac_fast.fisher as fisher
    seed = ExampleSeed(seed=2 ** 50 + 3, step=4, offset=13, draw=1)
    want = _unchunked_uniform(seed, shape, stream=2)
    monkeypatch.setattr(fisher, "HASH_CHUNK", chunk)
    got = seed.uniform(shape, torch.device("cpu"), stream=2)
    # blocks of rows (per <= chunk < numel), of columns (per > chunk), single entries
    # (chunk 1), one block (chunk >= numel)
    assert torch.equal(got, want)


def test_blocked_hash_bounds_its_temporaries(monkeypatch):
    import kfac_fast.fisher as fisher
    monkeypatch.setattr(fisher, "HASH_CHUNK", 40)
    sizes = []
    real = fisher._mix32_

    def spy(x):
        sizes.append(x.numel())
        return real(x)
    monkeypatch.setattr(fisher, "_mix32_", spy)
    ExampleSeed(seed=5).uniform((6, 30), torch.device("cpu"))
    assert max(sizes) <= 40 and sum(sizes) >= 6 * 30
