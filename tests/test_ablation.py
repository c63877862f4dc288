"""The ablation grid: its statistics on known answers, the plan (comparisons in two worlds, sweeps, shared
upstreams), params validation, the DVC queue, and the --quick flow end to end."""

import io
import json
import math
import shutil
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, project_env, tiny_params
from scipy import stats

from diht_core.config import ParamsError, deep_merge, load_params, validate_params
from diht_core.eval.ablation import (aggregate, binomial_se, compare, compare_table, dvc_queue_commands, holm, mean_se,
                                     mechanisms, min_detectable_difference, paired, plan, pooled_std, retest, runs,
                                     shared_prefix, split_sizes, stage_digests, upstream_digest, write_report, UPSTREAM)


def _results(levels: dict, seeds=range(5), n=200, spread=0.01):
    """Hand-made run records: arm -> level of the shape task (count fixed), seeds with a little noise."""
    rng = np.random.default_rng(0)
    out = []
    for arm, level in levels.items():
        for seed in seeds:
            main = {"synthetic_shape": level + spread * rng.standard_normal(), "synthetic_count": 0.4 + 0.01 * seed}
            out.append({"arm": arm, "seed": seed, "main": main, "mean_main": statistics.fmean(main.values()),
                        "chance": {"synthetic_shape": 0.25, "synthetic_count": 0.333},
                        "eval_n": {"synthetic_shape": n, "synthetic_count": n}, "mechanisms": {}})
    return out


def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): x4 = 0.02, x3 = 0.03, x2 = 0.06, x1 = 0.04 -> max so far 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.01, None, 0.5]) == [pytest.approx(0.02), None, pytest.approx(0.5)]  # None: not in the family
    assert holm([0.6, 0.7]) == [1.0, 1.0]
    assert holm([]) == []


def test_minimum_detectable_difference_by_hand():
    # 5 seeds per arm, pooled std 0.02: df = 8, t_0.975 = 2.306004, t_0.80 = 0.888890 (t tables)
    want = (2.306004 + 0.888890) * 0.02 * math.sqrt(1 / 5 + 1 / 5)
    assert min_detectable_difference(0.02, 5, 5) == pytest.approx(want, rel=1e-5)
    # 3 seeds: df = 4, t_0.975 = 2.776445, t_0.80 = 0.940965
    assert min_detectable_difference(0.023, 3, 3) == pytest.approx((2.776445 + 0.940965) * 0.023 * math.sqrt(2 / 3),
                                                                   rel=1e-5)
    assert min_detectable_difference(0.02, 1, 1) == math.inf
    assert pooled_std([1, 2, 3], [2, 4, 6]) == pytest.approx(math.sqrt((2 * 1 + 2 * 4) / 4))


def test_paired_test_over_the_common_seeds():
    a, b = [0.50, 0.61, 0.55, 0.70, 0.52], [0.48, 0.60, 0.52, 0.69, 0.49]
    got = paired(a, [0, 1, 2, 3, 4], b, [0, 1, 2, 3, 4])
    d = np.subtract(a, b)
    assert got["p_paired"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert got["sd_diff"] == pytest.approx(np.std(d, ddof=1))
    assert got["mdd_paired"] == pytest.approx((2.776445 + 0.940965) * np.std(d, ddof=1) / math.sqrt(5), rel=1e-5)
    assert got["seed_corr"] == pytest.approx(np.corrcoef(a, b)[0, 1]) and got["n_pairs"] == 5
    # matched by seed, not by position; a seed one arm lacks is left out
    shuffled = paired(a[::-1], [4, 3, 2, 1, 0], b[:4] + [9.0], [0, 1, 2, 3, 7])
    assert shuffled["n_pairs"] == 4 and shuffled["p_paired"] == pytest.approx(stats.ttest_rel(a[:4], b[:4]).pvalue)
    assert paired([0.75, 0.5], [0, 1], [0.5, 0.25], [0, 1])["p_paired"] is None  # equal differences: no spread
    assert paired([0.5], [0], [0.4], [0]) == {"n_pairs": 1, "p_paired": None, "sd_diff": pytest.approx(math.nan,
                                              nan_ok=True), "mdd_paired": math.inf, "seed_corr": None}


def test_binomial_sampling_error():
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.9, 400) == pytest.approx(0.015)
    assert mean_se([0.03, 0.04]) == pytest.approx(0.025)  # sqrt(0.03^2 + 0.04^2) / 2


def test_split_sizes_count_the_keys_of_the_shards(tmp_path):
    d = tmp_path / "eval" / "synthetic_shape" / "test"
    d.mkdir(parents=True)
    with tarfile.open(d / "000000.tar", "w") as tar:
        for key in ("a", "b", "c"):
            for ext in ("png", "cls"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = 1
                tar.addfile(info, io.BytesIO(b"x"))
    assert split_sizes(tmp_path, ["synthetic_shape", "synthetic_vqa"]) == {"synthetic_shape": 3}


def test_mechanisms_from_the_metrics_files(tmp_path):
    train, pl = tmp_path / "train.json", tmp_path / "pseudo_labels.json"
    assert mechanisms(train, pl) == {}  # no files: absent, never an error
    train.write_text(json.dumps({"final_loss": 1.0, "mechanisms": {
        "fff_mining": {"steps": [10, 20, 30], "precision": [0.2, 0.6, None], "recall": [0.5, 0.7, None],
                       "mined_pairs": [None, None, None]},  # None: nothing to measure at that step (the loop's)
        "hn_true_negative_weight_share": {"steps": [10], "i2t": [0.9], "t2i": [0.8]}}}))
    pl.write_text(json.dumps({"omitted_concepts": {"precision": 0.4, "recall": 0.3, "n_omitted": 12}}))
    got = mechanisms(train, pl)
    assert got["fff_mining"]["precision"] == {"final": 0.6, "mean": pytest.approx(0.4)}
    assert "mined_pairs" not in got["fff_mining"]  # never defined: absent
    assert got["hn_true_negative_weight_share"]["t2i"]["final"] == 0.8
    assert got["omitted_concepts"] == {"precision": 0.4, "recall": 0.3, "n_omitted": 12.0}


def _tests():
    return [{"comparison": "X", "kind": "comparison", "world": "premise on", "value": None, "baseline": "base",
             "component": "better"},
            {"comparison": "X", "kind": "comparison", "world": "premise off", "value": None, "baseline": "base off",
             "component": "same off"},
            {"comparison": "S", "kind": "sweep", "world": None, "value": 2, "default": 1, "key": "cat_filter.min_complexity",
             "baseline": "base", "component": "same"}]


def test_aggregate_welch_holm_mdd_and_sampling():
    res = _results({"base": 0.3, "better": 0.5, "same": 0.3, "base off": 0.3, "same off": 0.3})
    for r in res:  # one arm measured its mechanisms
        if r["arm"] == "better":
            r["mechanisms"] = {"fff_mining": {"precision": {"final": 0.5 + 0.1 * r["seed"], "mean": 0.4}}}
    rep = aggregate(res, _tests(), "quick")
    for name in ("base", "better"):
        vals = [r["main"]["synthetic_shape"] for r in res if r["arm"] == name]
        got = rep["arms"][name]["tasks"]["synthetic_shape"]
        assert got["mean"] == pytest.approx(np.mean(vals)) and got["std"] == pytest.approx(np.std(vals, ddof=1))
        assert got["eval_se"] == pytest.approx(math.sqrt(got["mean"] * (1 - got["mean"]) / 200))
    a = rep["arms"]["better"]
    se = math.sqrt(a["tasks"]["synthetic_shape"]["eval_se"] ** 2 + a["tasks"]["synthetic_count"]["eval_se"] ** 2) / 2
    assert a["sampling"]["eval_se_of_mean"] == pytest.approx(se)
    # 200 items give SE ~0.017 per task: not well below a seed spread of ~0.005
    assert a["sampling"]["eval_se_not_well_below_seed_std"] is True
    assert a["mechanisms"]["fff_mining"]["precision"]["final"] == pytest.approx(0.7)  # mean over 5 seeds
    assert a["mechanisms"]["omitted_concepts"] == "absent"
    assert rep["arms"]["base"]["mechanisms"]["fff_mining"] == "absent"
    x = rep["comparisons"]["X"]
    on, off = x["premise on"], x["premise off"]
    base = [r["mean_main"] for r in res if r["arm"] == "base"]
    better = [r["mean_main"] for r in res if r["arm"] == "better"]
    assert on["delta"] == pytest.approx(np.mean(better) - np.mean(base))
    assert on["p"] == pytest.approx(stats.ttest_ind(better, base, equal_var=False).pvalue)
    ps = [on["p"], off["p"], rep["sweeps"]["S"]["points"][0]["p"]]
    assert [on["p_holm"], off["p_holm"], rep["sweeps"]["S"]["points"][0]["p_holm"]] == pytest.approx(holm(ps))
    assert on["mdd"] == pytest.approx(min_detectable_difference(pooled_std(better, base), 5, 5))
    assert x["better_with_premise"] and x["vanishes_without_premise"]
    assert rep["tests"] == 3 and rep["correction"] == "holm"
    assert "**X** (beats its baseline with the premise (paired Holm p < 0.05): yes; difference vanishes without it: yes)" \
        in rep["table"]
    assert "| premise off | base off" in rep["table"] and "| chance |" in rep["table"]


def test_the_verdict_pairs_the_seeds():
    """Arms that share a seed's init and data order move together: a seed effect 10x the component's. Welch's test
    sees the seeds' spread and misses a steady gain of 0.01 a seed; the paired test, which the verdict uses, sees
    it; a stored report tested again gives the same numbers."""
    seed_effect = [0.0, 0.10, -0.08, 0.05, -0.12]
    rng = np.random.default_rng(1)
    res = []
    for arm, level in {"base": 0.3, "better": 0.31, "base off": 0.3, "same off": 0.3, "same": 0.3}.items():
        for seed, e in enumerate(seed_effect):
            shape = level + e + 0.002 * rng.standard_normal()
            res.append({"arm": arm, "seed": seed, "main": {"synthetic_shape": shape}, "mean_main": shape,
                        "chance": {"synthetic_shape": 0.25}, "eval_n": {"synthetic_shape": 10_000}, "mechanisms": {}})
    rep = aggregate(res, _tests(), "quick")
    on = rep["comparisons"]["X"]["premise on"]
    assert on["p"] > 0.5 and on["p_paired"] < 0.001 and on["seed_corr"] > 0.99
    assert on["mdd_paired"] < 0.01 < on["mdd"]
    assert rep["comparisons"]["X"]["better_with_premise"] and rep["comparisons"]["X"]["vanishes_without_premise"]
    assert on["p_paired_holm"] == pytest.approx(holm([t["p_paired"] for t in (on, rep["comparisons"]["X"]["premise off"],
                                                                               rep["sweeps"]["S"]["points"][0])])[0])
    shape = {a: [r["main"]["synthetic_shape"] for r in res if r["arm"] == a] for a in ("base", "better")}
    task = on["per_task"]["synthetic_shape"]
    assert task["p_paired"] == pytest.approx(stats.ttest_rel(shape["better"], shape["base"]).pvalue)
    assert task["delta"] == pytest.approx(np.mean(shape["better"]) - np.mean(shape["base"]))
    family = [t["per_task"]["synthetic_shape"]["p_paired"] for t in (on, rep["comparisons"]["X"]["premise off"],
                                                                      rep["sweeps"]["S"]["points"][0])]
    assert task["p_paired_holm"] == pytest.approx(holm(family)[0])
    assert "| X: premise on | +0.010 (" in rep["table"]
    old = json.loads(json.dumps(rep))
    for t in [*old["comparisons"]["X"].values(), *old["sweeps"]["S"]["points"]]:
        if isinstance(t, dict):
            for k in ("p_paired", "p_paired_holm", "mdd_paired", "seed_corr", "sd_diff", "n_pairs"):
                t.pop(k)
    old["comparisons"]["X"]["better_with_premise"] = False
    again = retest(old)
    assert again["comparisons"] == json.loads(json.dumps(rep["comparisons"]))
    assert again["table"] == rep["table"] and again["arms"] == old["arms"]


def test_retest_cli_rewrites_a_report_and_its_plots(tmp_path, monkeypatch):
    from flows.ablation import main
    rep = aggregate(_results({"base": 0.3, "better": 0.5, "same": 0.3, "base off": 0.3, "same off": 0.3}), _tests(),
                    "full")
    path = tmp_path / "metrics" / "ablation_x" / "ablation.json"
    write_report(rep, path, tmp_path / "elsewhere" / "ablation")
    old = json.loads(path.read_text())
    del old["comparisons"]["X"]["premise on"]["p_paired"]
    path.write_text(json.dumps(old))
    monkeypatch.chdir(tmp_path)
    main(["--retest", str(path.relative_to(tmp_path))])
    assert json.loads(path.read_text())["comparisons"] == json.loads(json.dumps(rep["comparisons"]))
    assert (tmp_path / "plots" / "ablation_x" / "ablation_effects.png").stat().st_size > 0
    path.write_text(json.dumps({"mode": "full", "configs": {}}))  # the old format: refused, named
    with pytest.raises(SystemExit, match="not an ablation report of this format"):
        main(["--retest", str(path)])


def test_compare_tells_identical_within_noise_and_not_reproduced(tmp_path, capsys):
    from flows.ablation import main
    levels = {"base": 0.3, "better": 0.5, "same": 0.3, "base off": 0.3, "same off": 0.3}
    ref = aggregate(_results(levels), _tests(), "full")
    assert compare(ref, json.loads(json.dumps(ref)))["reproduced"] == "identical"
    rerun = _results(levels)
    for r in rerun:  # another machine: each seed's value moves by less than the seed spread
        r["main"]["synthetic_shape"] += 0.002 * (-1) ** r["seed"]
        r["mean_main"] = statistics.fmean(r["main"].values())
    c = compare(ref, aggregate(rerun, _tests(), "full"))
    assert c["reproduced"] == "within noise" and not c["arms"]["base"]["identical"]
    assert all(abs(a["z"]) < 1 for a in c["arms"].values()) and all(t["agree"] for t in c["tests"].values())
    worse = aggregate(_results({**levels, "better": 0.3}), _tests(), "full")  # the effect gone: verdict and z differ
    c = compare(ref, worse)
    assert c["reproduced"] == "no" and c["arms"]["better"]["z"] < -10
    assert not c["tests"]["X: premise on"]["agree"]
    paths = []
    for name, rep in (("ref", ref), ("worse", worse)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(rep))
    with pytest.raises(SystemExit) as err:
        main(["--compare", *map(str, paths)])
    assert err.value.code == 1
    out = capsys.readouterr().out
    assert "reproduced: **no**" in out and "- X: premise on: Δ +0.100 -> +0.000" in out


def test_compare_a_partial_rerun_seed_by_seed(capsys):
    """A rerun of some seeds (every arm): compared seed by seed against the reference's same seeds, verdicts and z
    left out; any changed value is "no", with the arm's largest seed difference."""
    levels = {"base": 0.3, "better": 0.5, "same": 0.3, "base off": 0.3, "same off": 0.3}
    results = _results(levels)
    ref = aggregate(results, _tests(), "full")
    seed0 = aggregate([r for r in results if r["seed"] == 0], _tests(), "full")
    c = compare(ref, seed0)
    assert c["partial"] and c["reproduced"] == "identical" and c["tests"] == {}
    assert all(a["seeds"] == [0] and a["seed_diffs"] == {0: 0.0} for a in c["arms"].values())
    moved = json.loads(json.dumps([r for r in results if r["seed"] == 0]))
    spread = ref["arms"]["better"]["mean_main"]["std"]
    moved[1]["main"]["synthetic_shape"] += spread  # arm "better", seed 0: its task mean moves spread / 2
    moved[1]["mean_main"] = statistics.fmean(moved[1]["main"].values())
    assert moved[1]["arm"] == "better"
    c = compare(ref, aggregate(moved, _tests(), "full"))
    assert c["reproduced"] == "no" and not c["arms"]["better"]["identical"] and c["arms"]["base"]["identical"]
    assert c["arms"]["better"]["diff"] == pytest.approx(spread / 2) and c["arms"]["better"]["z"] is None
    seed0 = ref["arms"]["better"]["mean_main"]["values"][ref["arms"]["better"]["seeds"].index(0)]
    assert c["arms"]["better"]["ref"] == seed0  # the reference's same seed, not its 5-seed mean
    assert "a partial rerun" in compare_table(c) and "| better | 0 |" in compare_table(c)


def test_report_files(tmp_path):
    rep = aggregate(_results({"base": 0.3, "better": 0.5, "same": 0.3, "base off": 0.3, "same off": 0.3}), _tests(),
                    "quick")
    paths = write_report(rep, tmp_path / "m" / "ablation.json", tmp_path / "p" / "ablation")
    assert [p.name for p in paths] == ["ablation.json", "ablation.csv", "ablation.png", "ablation_effects.png"]
    assert json.loads(paths[0].read_text())["comparisons"]["X"]["premise on"]["p_holm"] is not None
    assert all(p.stat().st_size > 0 for p in paths)
    assert paths[1].read_text().count("\n") == 1 + 5 * 2 + 5  # header, arm x task, arm means


def test_a_control_world_that_keeps_the_effect_does_not_vanish():
    res = _results({"base": 0.3, "better": 0.5, "base off": 0.3, "same off": 0.45, "same": 0.3})
    rep = aggregate(res, _tests(), "quick")
    assert not rep["comparisons"]["X"]["vanishes_without_premise"]
    res = _results({"base": 0.5, "better": 0.3, "same": 0.3, "base off": 0.3, "same off": 0.3})
    assert not aggregate(res, _tests(), "quick")["comparisons"]["X"]["better_with_premise"]  # significant, but worse
    rep = aggregate(_results({"base": 0.3, "better": 0.5, "same": 0.3, "base off": 0.3, "same off": 0.3}, n=100_000),
                    _tests(), "quick")
    assert rep["arms"]["base"]["sampling"]["eval_se_not_well_below_seed_std"] is False  # 10^5 items: tiny SE


def test_a_comparison_without_a_control_world_is_tested_where_its_premise_holds():
    """premise_off: null (a diagnostic such as an oracle filter): no control-world arms, no test there, and the
    report says there is no control world rather than that the effect does not vanish."""
    raw = tiny_params()
    raw["ablation"] = {**raw.get("ablation", {}), "sweeps": {}, "also_run": [], "comparisons": {
        "O": {"component": "oracle-cat", "baseline": "baseline", "premise_on": {"uninformative": True},
              "premise_off": None}}}  # in place of the default comparisons (deep_merge would add to them)
    p = validate_params(raw)
    arms, tests = plan(p)
    assert list(arms) == ["baseline", "oracle-cat"]
    assert [(t["comparison"], t["world"]) for t in tests] == [("O", "premise on")]
    assert arms["oracle-cat"]["overrides"]["train"]["drop_planted"] == ["junk", "text_in_image"]
    rep = aggregate(_results({"baseline": 0.3, "oracle-cat": 0.5}), tests, "quick")
    o = rep["comparisons"]["O"]
    assert o["better_with_premise"] and o["vanishes_without_premise"] is None and "premise off" not in o
    assert "**O** (beats its baseline with the premise (paired Holm p < 0.05): yes; no control world)" in rep["table"]
    with pytest.raises(ParamsError, match="premise_off"):  # still required: null must be said
        validate_params({"ablation": {"comparisons": {"O": {"component": "cat", "baseline": "baseline"}}}})


def test_plan_every_comparison_in_both_worlds_and_the_sweeps():
    p = validate_params(tiny_params())
    arms, tests = plan(p)
    pairs = {(t["comparison"], t["world"]): (t["baseline"], t["component"]) for t in tests if t["kind"] == "comparison"}
    assert pairs[("CAT", "premise on")] == ("baseline", "cat")
    assert pairs[("CAT", "premise off")] == ("baseline [uninformative=false]", "cat [uninformative=false]")
    assert pairs[("distillation", "premise on")] == ("cat", "cat+distill")
    off = "[same_scene_rate=0, batch_sampler=distinct_scenes]"  # a premise can set both arms' training too
    assert pairs[("FFF mining", "premise off")] == (f"sigmoid-2caps {off}", f"fff {off}")
    assert arms[f"fff {off}"]["overrides"]["train"]["batch_sampler"] == "distinct_scenes"
    assert "batch_sampler" not in arms["fff"]["overrides"]["train"]
    assert len(pairs) == 2 * len(p.ablation.comparisons)
    assert arms["cat [uninformative=false]"]["overrides"]["download"] == {"world": {"uninformative": False}}
    sweeps = [t for t in tests if t["kind"] == "sweep"]
    complexity = [t for t in sweeps if t["comparison"] == "CAT complexity"]
    assert [(t["value"], t["default"], t["component"]) for t in complexity] == [
        (2, 1, "cat [min_complexity=2]"), (3, 1, "cat [min_complexity=3]")]  # C1 is the default: `cat` itself
    assert arms["cat [min_complexity=3]"]["overrides"]["cat_filter"] == {"min_complexity": 3}
    topk = [t["value"] for t in sweeps if t["comparison"] == "pseudo-label top-k"]
    assert topk == [3, 5, 20] and all(t["baseline"] == "cat+distill" for t in sweeps if t["comparison"] == "pseudo-label top-k")
    assert arms["cat+hn-nce [hn_beta=1]"]["overrides"]["train"]["hn_beta"] == 1.0
    assert "diht" in arms  # also_run
    # the default world's arms are shared: `cat` is the baseline of distillation, HN-NCE (random batches: the control
    # of its hard batches too) and the complexity sweep
    assert sum(1 for t in tests if t["baseline"] == "cat") == 2 + 3
    hard = "[batch_sampler=swap_families]"
    assert pairs[("HN-NCE, hard batches", "premise on")] == (f"cat {hard}", f"cat+hn-nce {hard}")
    assert pairs[("HN-NCE, hard batches", "premise off")] == pairs[("HN-NCE", "premise on")] == ("cat", "cat+hn-nce")


def test_runs_share_an_upstream_per_distinct_upstream(tmp_path):
    p = validate_params(tiny_params())
    rs = runs(p, {}, tmp_path)
    arms, _ = plan(p)
    assert len(rs) == len(arms) * len(p.ablation.seeds)
    by_arm = {r["arm"]: r["upstream_digest"] for r in rs}
    assert by_arm["cat"] == by_arm["baseline"] == by_arm["cat+hn-nce [hn_beta=1]"] == by_arm["fff"]
    assert by_arm["cat [uninformative=false]"] == by_arm["baseline [uninformative=false]"] != by_arm["cat"]
    assert by_arm["cat [min_complexity=2]"] != by_arm["cat"]
    # default world, 4 control worlds, C2, C3, top-k 3, 5, 20
    assert len(set(by_arm.values())) == 1 + 4 + 2 + 3
    order = [r["upstream_digest"] for r in rs]
    assert order == sorted(order, key=order.index)  # grouped: each upstream's runs together
    r = next(r for r in rs if r["arm"] == "cat [omit_prob=0]" and r["seed"] == 1)
    assert r["overrides"]["paths"]["data"] == str(tmp_path / "upstream" / r["upstream_digest"] / "data")
    assert r["overrides"]["train"]["seed"] == 1 and r["overrides"]["download"]["world"] == {"omit_prob": 0.0}
    assert validate_params(deep_merge(tiny_params(), r["overrides"])).download.world.omit_prob == 0.0


def test_a_run_is_the_same_run_whatever_the_grid_around_it(tmp_path):
    """`--set ablation.seeds=[0,1,2]` then the default 5 seeds: the first three seeds' runs have the same
    overrides (their identity), so a grown grid reuses them."""
    three = runs(validate_params(deep_merge(tiny_params(), {"ablation": {"seeds": [0, 1, 2]}})),
                 {"ablation": {"seeds": [0, 1, 2]}, "download": {"num_train": 50}}, tmp_path)
    five = runs(validate_params(deep_merge(tiny_params(), {"ablation": {"seeds": [0, 1, 2, 3, 4]}})),
                {"download": {"num_train": 50}}, tmp_path)
    key = {(r["arm"], r["seed"]): r["overrides"] for r in five}
    assert all(key[(r["arm"], r["seed"])] == r["overrides"] for r in three)
    assert all("ablation" not in r["overrides"] for r in three)


WARM = "ablation/full/runs/cat/seed{seed}/models/model.pt"  # configs/ablation_hn_warm.yaml


def _full_grid_runs(params_path: Path) -> dict:
    """(arm, seed) -> overrides of the full grid a params file plans, loaded as flows/ablation.py loads it."""
    p = load_params(params_path, None)
    p = load_params(params_path, deep_merge(p.ablation.full, {}))
    return {(r["arm"], r["seed"]): r["overrides"] for r in runs(p, p.ablation.full, Path("ablation/full"))}


@pytest.mark.parametrize("subset", sorted((ROOT / "configs").glob("ablation_*.yaml")), ids=lambda p: p.stem)
def test_a_subset_config_runs_the_whole_grids_own_runs(subset):
    """Each configs/ablation_*.yaml loads and plans; every run of it whose arm the whole grid (params.yaml) also
    has is the grid's run (the same overrides, so either reuses the other's); its other arms (oracles, variants)
    are diagnostics of its own."""
    grid, mine = _full_grid_runs(ROOT / "params.yaml"), _full_grid_runs(subset)
    shared = set(mine) & set(grid)
    assert shared, f"{subset.name} shares no run with the whole grid"
    assert all(mine[k] == grid[k] for k in shared)
    assert {arm for arm, _ in set(mine) - shared} <= {"oracle-cat", "oracle-aligned", "oracle-clean", "oracle-junk",
                                                      "oracle-painted", "fff-text", "cat+hn-nce-detached",
                                                      "cat [logit_scale_init=100]", "cat+hn-nce [logit_scale_init=100]",
                                                      "cat [omit_prob=0.9]", "cat+distill [omit_prob=0.9]",
                                                      f"cat [init_from={WARM}]", f"cat+hn-nce [init_from={WARM}]"}


def test_warm_starts_run_after_the_runs_they_start_from():
    order = [arm for arm, _ in _full_grid_runs(ROOT / "configs" / "ablation_hn_warm.yaml")]
    warm = [i for i, arm in enumerate(order) if "init_from" in arm]
    assert len(warm) == 10 and min(warm) > max(i for i, arm in enumerate(order) if arm == "cat")


def test_upstream_digest_ignores_the_engine_not_what_is_written():
    """A grid resumed with its upstream stages on other engines (Dask, a process pool) reuses its upstreams; a
    param that changes what they write does not, nor the teacher's ranks (their threads can round differently)."""
    base = upstream_digest(validate_params(tiny_params()))
    engines = {"cat_filter": {"task_runner": "dask", "workers": 4},
               "download": {"url_list": {"task_runner": "process", "processes": 4, "threads": 8}}}
    assert upstream_digest(validate_params(deep_merge(tiny_params(), engines))) == base
    ranks = {"launcher": "torchrun", "nproc_per_node": 8, "nnodes": 2}
    two_heads = [upstream_digest(validate_params(deep_merge(tiny_params(), {"teacher": {**ranks, "rdzv_endpoint": e}})))
                 for e in ("head:29500", "other:29400")]
    assert two_heads[0] == two_heads[1] != base
    assert upstream_digest(validate_params(deep_merge(tiny_params(), {"teacher": {"device": "cuda"}}))) != base
    assert upstream_digest(validate_params(deep_merge(tiny_params(), {"cat_filter": {"min_complexity": 2}}))) != base


def test_upstreams_share_their_leading_stages():
    raw = tiny_params()
    base = stage_digests(validate_params(raw))
    shared = lambda ov: shared_prefix(base, stage_digests(validate_params(deep_merge(raw, ov))))
    assert shared({}) == len(UPSTREAM)
    assert shared({"pseudo_labels": {"top_k": 3}}) == 4      # everything but pseudo_labels
    assert shared({"cat_filter": {"min_complexity": 2}}) == 1  # the download only
    assert shared({"download": {"world": {"omit_prob": 0.0}}}) == 0


def test_quick_grid_exercises_every_path_with_two_value_sweeps():
    p = validate_params(deep_merge(tiny_params(), tiny_params()["ablation"]["quick"]))
    arms, tests = plan(p)
    assert len(p.ablation.seeds) == 2
    assert {(t["comparison"], t["world"]) for t in tests if t["kind"] == "comparison"} == {
        (c, w) for c in p.ablation.comparisons for w in ("premise on", "premise off")}
    assert {t["comparison"] for t in tests if t["kind"] == "sweep"} == set(p.ablation.sweeps)
    assert all(len(s.values) == 2 for s in p.ablation.sweeps.values())


@pytest.mark.parametrize("path, value, match", [
    (("configs", "fff"), {"loss": "infonce", "captions_per_image": 2}, "ablation.*configs.fff"),
    (("configs", "cat"), {"no_such_knob": 1}, "configs.cat"),
    (("comparisons", "CAT"), {"baseline": "nope"}, "comparisons.CAT.baseline"),
    (("comparisons", "CAT"), {"premise_off": {"no_such_premise": True}}, "premise_off"),
    (("sweeps", "CAT complexity"), {"key": "cat_filter.no_such_key"}, "not a param"),
    (("sweeps", "pseudo-label top-k"), {"values": [0]}, "not a valid pseudo_labels.top_k"),
])
def test_grid_params_are_validated(path, value, match):
    bad = tiny_params()
    bad["ablation"][path[0]][path[1]].update(value)
    with pytest.raises(ParamsError, match=match):
        validate_params(bad)


def test_dvc_queue_commands_set_every_override():
    p = validate_params(tiny_params())
    cmds = dvc_queue_commands(p)
    assert len(cmds) == len(plan(p)[0]) * len(p.ablation.seeds)
    first = cmds[0]
    assert first[:6] == ["dvc", "exp", "run", "--queue", "-n", "baseline-s0"]
    sets = [first[i + 1] for i, a in enumerate(first) if a == "-S"]
    assert "train.source=raw" in sets and "train.seed=0" in sets and f"train.steps={p.ablation.steps}" in sets
    off = next(c for c in cmds if c[5] == "cat-uninformative-false-s0")
    assert "download.world.uninformative=false" in off
    c2 = next(c for c in cmds if c[5] == "cat-min_complexity-2-s0")
    assert "cat_filter.min_complexity=2" in c2
    assert len({c[5] for c in cmds}) == len(cmds)  # experiment names are unique
    eval_sets = {f"download.eval.{k}={v}" for k, v in p.ablation.full["download"]["eval"].items()}
    assert all(eval_sets <= set(c) for c in cmds)  # the full grid's own eval splits (ablation.full)


def test_full_grid_evaluates_on_its_larger_eval_splits():
    """ablation.full (eval splits 4x the demo's) is in every run of the full grid and in its upstream digests."""
    p = validate_params(tiny_params())
    grown = validate_params(deep_merge(p.model_dump(), p.ablation.full))
    assert grown.download.eval.retrieval_images == 4 * validate_params({}).download.eval.retrieval_images
    plain, full = runs(p, {}, Path("a")), runs(grown, p.ablation.full, Path("a"))
    assert all(r["overrides"]["download"]["eval"] == p.ablation.full["download"]["eval"] for r in full)
    assert {r["upstream_digest"] for r in plain}.isdisjoint(r["upstream_digest"] for r in full)


@pytest.mark.slow
def test_dvc_experiments_queue_in_a_git_repo(tiny_project):
    raw = tiny_params()  # the grid with the quick sweeps and one seed: one experiment per arm
    raw["ablation"] = deep_merge(raw["ablation"], {"seeds": [0], "sweeps": raw["ablation"]["quick"]["ablation"]["sweeps"]})
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = project_env(tiny_project)
    run = lambda *a: subprocess.run(a, cwd=tiny_project, env=env, capture_output=True, text=True, timeout=300)
    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                                                     "--allow-empty", "-m", "init"], ["dvc", "init", "-q"]):
        assert run(*cmd).returncode == 0
    run("git", "add", "-A")
    assert run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "project").returncode == 0
    out = run(sys.executable, "-m", "flows.ablation", "--dvc-queue")
    assert out.returncode == 0, out.stderr[-2000:]
    status = run("dvc", "queue", "status")
    assert status.returncode == 0 and status.stdout.count("Queued") == len(dvc_queue_commands(
        validate_params(raw))), status.stdout
    assert "cat-uninformative-false-s0" in status.stdout


@pytest.mark.slow
def test_quick_ablation_flow_end_to_end(tiny_project):
    """--quick: each upstream once, every arm x 2 seeds, the report in JSON/plot/MLflow/Prefect; a rerun resumes."""
    import mlflow

    env = project_env(tiny_project)
    cmd = [sys.executable, "-m", "flows.ablation", "--quick"]
    # a hang guard, not a time goal: minutes on 2 idle cores, 30+ beside two other training runs
    proc = subprocess.run(cmd, cwd=tiny_project, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tiny_project / "metrics" / "ablation_quick.json").read_text())
    p = validate_params(yaml.safe_load((tiny_project / "params.yaml").read_text()))
    quick = validate_params(deep_merge(p.model_dump(), p.ablation.quick))
    arms, tests = plan(quick)
    n_configs = len(arms)
    assert set(rep["arms"]) == set(arms) and all(a["mean_main"]["n"] == 2 for a in rep["arms"].values())
    assert all(set(c) >= {"premise on", "premise off"} for c in rep["comparisons"].values())
    assert set(rep["comparisons"]) == set(quick.ablation.comparisons) and set(rep["sweeps"]) == set(quick.ablation.sweeps)
    assert rep["tests"] == len(tests)
    for a in rep["arms"].values():  # the eval splits were counted; mechanisms measured or reported absent
        assert a["sampling"]["eval_se_of_mean"] > 0 and set(a["mechanisms"]) >= {"fff_mining", "omitted_concepts"}
    hard = rep["arms"]["cat+hn-nce [batch_sampler=swap_families]"]["mechanisms"]["hn_hard_negative_weight_share"]
    assert hard["uniform"]["mean"] > 0 and 0 < hard["i2t"]["mean"] < 1  # its hard negatives were in the batches
    assert len(list((tiny_project / "ablation" / "quick" / "upstream").iterdir())) == len(
        {r["upstream_digest"] for r in runs(quick, {}, tiny_project)})
    assert (tiny_project / "plots" / "ablation_quick.png").stat().st_size > 0
    assert (tiny_project / "plots" / "ablation_quick_effects.png").stat().st_size > 0
    assert "| baseline | 2 |" in proc.stdout and "**CAT** (beats its baseline" in proc.stdout
    mlflow.set_tracking_uri(f"sqlite:///{tiny_project / '.state' / 'mlflow.db'}")
    mruns = mlflow.search_runs(experiment_names=["diht"], output_format="list")
    parent = [r for r in mruns if r.data.tags.get("diht.ablation") == "quick"]
    assert len(parent) == 1
    children = [r for r in mruns if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id
                and "diht.ablation.config" in r.data.tags]
    assert len(children) == 2 * n_configs
    trains = [r for r in mruns if r.data.tags.get("diht.stage") == "train"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trains} == {c.info.run_id for c in children}
    art = subprocess.run(["prefect", "artifact", "inspect", "ablation-quick"], cwd=tiny_project,
                         env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=120)
    assert art.returncode == 0 and "baseline" in art.stdout, art.stdout[-2000:] + art.stderr[-2000:]
    # a rerun keeps every finished run: no new training
    proc = subprocess.run(cmd, cwd=tiny_project, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mruns = mlflow.search_runs(experiment_names=["diht"], output_format="list")
    assert len([r for r in mruns if r.data.tags.get("diht.stage") == "train"]) == len(trains)
    assert f"[ablation] {2 * n_configs} runs: {2 * n_configs} done before, 0 to run" in proc.stdout + proc.stderr
    assert all(r.info.status == "FINISHED" for r in mruns)  # none left RUNNING
    shutil.rmtree(tiny_project / "ablation" / "quick" / "runs" / "baseline" / "seed1")  # one run lost: --status
    status = subprocess.run([*cmd, "--status"], cwd=tiny_project, env=env, capture_output=True, text=True, timeout=600)
    assert status.returncode == 0, status.stderr[-3000:]
    assert f"ablation (quick): {2 * n_configs - 1} of {2 * n_configs} runs done" in status.stdout
    assert "| baseline | 1 of 2 |" in status.stdout and "| cat | 2 of 2 |" in status.stdout
