"""The transformer demo (`make demo-lm`): its corpus, its model, and a tiny end-to-end run."""
from __future__ import annotations

import random

import pytest
import torch

from kfac_fast.demo_lm import cli, text
from kfac_fast.demo_lm.model import CharTransformer, token_loss, validation_loss
from kfac_fast.demo_lm.report import best_runs, steps_to_reach
from kfac_fast.demo_lm.text import Corpus, make_text
from kfac_fast.demo_lm.training import Run


def test_text_is_deterministic_lower_case_and_agrees():
    a, b = make_text(5000, seed=3), make_text(5000, seed=3)
    assert a == b and len(a) == 5000 and a != make_text(5000, seed=4)
    assert set(a) <= set("abcdefghijklmnopqrstuvwxyz ,.\n")
    assert text._third_person("carry") == "carries" and text._third_person("watch") == "watches"
    writer = text._Writer(random.Random(0))
    for plural in (False, True):  # the verb agrees with the subject's number
        first = {writer.verb_phrase(plural).split()[0] for _ in range(200)}
        third = {text._third_person(v) for v in (*text.VERBS, *text.INTRANSITIVE)}
        assert (first <= third) if not plural else not (first & third)


def test_corpus_windows_are_next_character_targets():
    corpus = Corpus(train_chars=3000, val_chars=1000)
    x, y = corpus.batch(corpus.train, 5, 12, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 12)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_model_is_causal_and_loss_is_nats_per_character():
    torch.manual_seed(0)
    model = CharTransformer(11, d=16, heads=2, blocks=1, context=8)
    x = torch.randint(0, 11, (3, 8))
    changed = x.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    torch.testing.assert_close(model(x)[:, :5], model(changed)[:, :5])  # the future is not seen
    y = torch.randint(0, 11, (3, 8))
    torch.testing.assert_close(torch.tensor(validation_loss(model, x, y)), token_loss(model(x), y).detach())


def test_report_picks_the_best_mean_over_seeds_and_counts_steps():
    runs = [Run("adamw", 1e-3, s, [0, 5, 10], [0, 1, 2], [3.0, 2.5, v]) for s, v in ((0, 2.0), (1, 2.2))]
    runs += [Run("adamw", 3e-3, s, [0, 5, 10], [0, 1, 2], [3.0, 2.4, v]) for s, v in ((0, 1.9), (1, 2.1))]
    best = best_runs(runs)["adamw"]
    assert {r.value for r in best} == {3e-3}
    assert steps_to_reach(([0, 5, 10], [0, 1, 2], [3.0, 2.4, 2.0]), 2.4) == 5


def test_quick_run_prints_the_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["--quick", "--methods", "adamw,kfac,kfac-opt", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "AdamW" in out and "K-FAC + AdamW" in out and "KFAC (paper)" in out and "best K-FAC row" in out
    assert (tmp_path / "demo_lm.png").stat().st_size > 0


def test_bad_methods_are_refused_naming_the_argument(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--methods", "adamw,sgd"])
    assert "--methods" in capsys.readouterr().err
