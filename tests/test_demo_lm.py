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


def test_table_states_each_rows_cost_against_adamw():
    from kfac_fast.demo_lm.report import table

    runs = [Run("adamw", 1e-2, s, [0, 5, 10], [0, 1, 2], [3.0, 2.5, 2.0]) for s in (0, 1)]
    runs += [Run("kfac-adam", 1e-2, s, [0, 5, 10], [0, 1.5, 3], [3.0, 1.9, 1.5]) for s in (0, 1)]
    lines = table(runs)
    assert lines[0].split()[-2:] == ["x", "AdamW"]
    assert lines[2].startswith("K-FAC eigen-Adam") and lines[2].split()[-1] == "1.50"
    assert "5 (50%)" in lines[2]
    assert lines[4] == ("  K-FAC eigen-Adam: AdamW's final loss at 50% of its steps (met); "
                        "step 1.50x AdamW's (met)")
    assert lines[5] == "K-FAC rows meeting every target: K-FAC eigen-Adam"
    slow = [Run("kfac-adam", 1e-2, s, [0, 5, 10], [0, 3, 6], [3.0, 2.1, 1.5]) for s in (0, 1)]
    soap = [Run("soap", 1e-2, s, [0, 5, 10], [0, 1, 2], [3.0, 2.0, 1.4]) for s in (0, 1)]
    lines = table(runs[:2] + slow + soap)
    assert lines[-2] == ("  K-FAC eigen-Adam: AdamW's final loss at 100% of its steps (NOT met); "
                         "1.500 vs SOAP 1.400 (NOT met); step 3.00x AdamW's (NOT met)")
    assert lines[-1] == "K-FAC rows meeting every target: none"


def test_quick_run_prints_the_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["--quick", "--methods", "adamw,kfac,kfac-adam,kfac-opt", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "AdamW" in out and "K-FAC + AdamW" in out and "KFAC (paper)" in out and "K-FAC eigen-Adam" in out
    assert "K-FAC rows meeting every target" in out
    assert (tmp_path / "demo_lm.png").stat().st_size > 0


def test_bad_methods_are_refused_naming_the_argument(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--methods", "adamw,sgd"])
    assert "--methods" in capsys.readouterr().err


def test_timing_alternates_every_method_and_states_ratios(capsys):
    from kfac_fast.demo_lm import timing

    assert timing.main(["--quick", "--reps", "2", "--steps", "2", "--methods", "adamw,kfac-adam,kfac-opt"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 alternations of 2 steps")
    assert lines[1].startswith("AdamW") and " 1.00x AdamW" in lines[1]
    assert lines[2].startswith("K-FAC eigen-Adam") and lines[3].startswith("KFAC (paper)")
    assert all(line.count("(runs: ") == 1 and len(line.split("(runs: ")[1].split()) == 2 for line in lines[1:])
    with pytest.raises(SystemExit):
        timing.main(["--methods", "kfac"])  # no AdamW to compare with
