"""The ablation study with power: each component against its own baseline, in the world where its premise holds
and in its control world; the paper's sweeps; the statistics (mean +- std over seeds, the paired t-test over the
seeds both arms ran and Welch's beside it, Holm's correction over every test, the minimum detectable difference, the
evaluation's own sampling error) and the report."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import statistics
import tarfile
from pathlib import Path

from scipy import stats as sps

from ..config import Params, deep_merge, split_premise
from ..data.files import atomic_write_text
from ..plots import pyplot, save_figure

UPSTREAM = ("download", "cat_filter", "concepts", "teacher", "pseudo_labels")
UPSTREAM_SECTIONS = ("seed", "download", "cat_filter", "concepts", "teacher", "pseudo_labels")
STAGE_READS = {"download": ("seed", "download"), "cat_filter": ("cat_filter",), "concepts": ("concepts",),
               "teacher": ("teacher",), "pseudo_labels": ("pseudo_labels",)}  # the sections each stage adds
# params that choose where and on how many processes a stage runs, not what it writes (tested byte-equal across
# engines): left out of the upstream digests, so a grid resumed on another engine or cluster reuses its upstreams.
# The teacher's launcher and ranks stay in: a rank's thread count can change the features' fp16 rounding.
ENGINE_KEYS = {"download.url_list": ("threads", "task_runner", "processes", "dask_address"),
               "cat_filter": ("workers", "task_runner", "dask_address"),
               "teacher": ("rdzv_endpoint",)}
MECHANISMS = ("fff_mining", "hn_true_negative_weight_share", "hn_hard_negative_weight_share", "omitted_concepts")
WELL_BELOW = 0.5  # the evaluation's sampling error is "well below" the seed spread when under half of it


def nested(key: str, value) -> dict:
    """{"a": {"b": value}} of the dotted key "a.b"."""
    *parents, leaf = key.split(".")
    out: dict = {leaf: value}
    for part in reversed(parents):
        out = {part: out}
    return out


def lookup(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def fmt(v) -> str:
    return json.dumps(v) if isinstance(v, bool) or v is None else f"{v:g}" if isinstance(v, float) else str(v)


def plan(params: Params) -> tuple[dict[str, dict], list[dict]]:
    """The grid: (arms, tests). An arm is a config in a world (or at a sweep value): name -> {"config", "overrides"
    of the whole params}; arms of the same config and resolved params are one arm, named by the config and what
    differs from the defaults. A test compares two arms: {"comparison", "kind": "comparison" | "sweep", "world":
    "premise on" | "premise off" | None, "value", "baseline", "component"} (arm names)."""
    a = params.ablation
    dump = params.model_dump()
    arms: dict[str, dict] = {}

    def arm(config: str, premise: dict | None = None, key: str | None = None, value=None) -> str:
        world, train = split_premise(premise or {})
        ov = {"train": {**a.configs[config], **train}}
        differs = [f"{k}={fmt(v)}" for k, v in world.items() if dump["download"]["world"][k] != v]
        if differs:
            ov = deep_merge(ov, {"download": {"world": dict(world)}})
        differs += [f"{k}={fmt(v)}" for k, v in train.items() if a.configs[config].get(k, dump["train"][k]) != v]
        if key is not None and lookup(deep_merge(dump, ov), key) != value:
            ov, differs = deep_merge(ov, nested(key, value)), differs + [f"{key.split('.')[-1]}={fmt(value)}"]
        name = config + (f" [{', '.join(differs)}]" if differs else "")
        arms.setdefault(name, {"config": config, "overrides": ov})
        return name

    tests = []
    for name, c in a.comparisons.items():
        for world, premise in (("premise on", c.premise_on), ("premise off", c.premise_off)):
            if premise is None:  # no control world (a diagnostic)
                continue
            tests.append({"comparison": name, "kind": "comparison", "world": world, "value": None,
                          "baseline": arm(c.baseline, premise), "component": arm(c.component, premise)})
    for name, sw in a.sweeps.items():
        default = lookup(deep_merge(dump, {"train": dict(a.configs[sw.config])}), sw.key)
        base = arm(sw.config)
        for v in sw.values:
            if v != default:
                tests.append({"comparison": name, "kind": "sweep", "world": None, "value": v, "default": default,
                              "key": sw.key, "baseline": base, "component": arm(sw.config, key=sw.key, value=v)})
    for config in a.also_run:
        arm(config)
    return arms, tests


def runs(params: Params, base_overrides: dict, root: Path) -> list[dict]:
    """Every run of the grid, grouped by upstream: {"arm", "seed", "overrides" (of the whole params), "upstream"
    (the overrides its upstream stages run with), "upstream_digest"}. Each distinct upstream writes under
    root/upstream/<digest>/; each run its models, metrics and plots under root/runs/<arm>/seed<k>/."""
    a = params.ablation
    arms, _ = plan(params)
    if len({slug(n) for n in arms}) < len(arms):
        raise ValueError(f"ablation: two arms share a folder name: {sorted(slug(n) for n in arms)}")
    dump = what_is_written(params.model_dump())
    run_overrides = {k: v for k, v in base_overrides.items() if k != "ablation"}  # the grid's shape is no run's
    out = []
    for name, arm in arms.items():
        up_ov = {k: v for k, v in arm["overrides"].items() if k in UPSTREAM_SECTIONS}
        up = digest({k: v for k, v in deep_merge(dump, up_ov).items() if k in UPSTREAM_SECTIONS})
        up_dir = root / "upstream" / up
        upstream = deep_merge(deep_merge(run_overrides, up_ov),
                              {"paths": {k: str(up_dir / k) for k in ("data", "models", "metrics", "plots")}})
        for seed in a.seeds:
            train = {**arm["overrides"]["train"], "steps": a.steps, "batch_size": a.batch_size, "seed": seed}
            ov = deep_merge(upstream, {
                "train": train, "benchmark": {"checkpoint": None}, "mlflow": {"registered_model": False},
                "paths": {k: str(root / "runs" / slug(name) / f"seed{seed}" / k) for k in ("models", "metrics", "plots")}})
            out.append({"arm": name, "seed": seed, "overrides": ov, "upstream": upstream, "upstream_digest": up})
    order = list(dict.fromkeys(r["upstream_digest"] for r in out))  # warm starts after the runs they start from
    return sorted(out, key=lambda r: (order.index(r["upstream_digest"]), r["overrides"]["train"].get("init_from") is not None))


def what_is_written(dump: dict) -> dict:
    """The params dump without ENGINE_KEYS."""
    out = copy.deepcopy(dump)
    for section, keys in ENGINE_KEYS.items():
        d = lookup(out, section)
        for k in keys:
            d.pop(k, None)
    return out


def upstream_digest(params: Params) -> str:
    """The identity of the upstream stages' outputs: the params they read (not where they write them, nor on
    which engine)."""
    dump = what_is_written(params.model_dump())
    return digest({k: dump[k] for k in UPSTREAM_SECTIONS})


def stage_digests(params: Params) -> list[str]:
    """Per upstream stage, the digest of the params it and the stages before it read: two upstreams whose
    digests agree up to stage k have the same outputs up to stage k (a top-k sweep shares everything but
    pseudo_labels)."""
    dump, read, out = what_is_written(params.model_dump()), [], []
    for stage in UPSTREAM:
        read += STAGE_READS[stage]
        out.append(digest({k: dump[k] for k in read}))
    return out


def shared_prefix(a: list[str], b: list[str]) -> int:
    """How many leading stages two upstreams share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def slug(name: str) -> str:
    """A file and MLflow metric name of an arm's or a test's name (letters, digits, - _ . only)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: no test, left out of the family):
    the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    idx = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * pvalues[i]))
        out[i] = running
    return out


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Welch's two-sided t-test of two samples' means; None when it cannot be computed (a sample of one, or no
    spread in either)."""
    if len(a) < 2 or len(b) < 2 or statistics.pvariance(a) + statistics.pvariance(b) == 0:
        return None
    return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def pooled_std(a: list[float], b: list[float]) -> float:
    """The seeds' pooled standard deviation: sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2))."""
    df = len(a) + len(b) - 2
    if df < 1:
        return math.nan
    var = lambda x: statistics.variance(x) if len(x) > 1 else 0.0
    return math.sqrt(((len(a) - 1) * var(a) + (len(b) - 1) * var(b)) / df)


def min_detectable_difference(sd: float, n_a: int, n_b: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference of two means that a two-sided t-test at `alpha` detects with probability
    `power`: MDD = (t_{1-alpha/2, df} + t_{power, df}) * sd * sqrt(1/n_a + 1/n_b), df = n_a + n_b - 2, sd the
    pooled seed std (the normal approximation with t quantiles for the few seeds)."""
    df = n_a + n_b - 2
    if df < 1 or not math.isfinite(sd):
        return math.inf
    return float((sps.t.ppf(1 - alpha / 2, df) + sps.t.ppf(power, df)) * sd * math.sqrt(1 / n_a + 1 / n_b))


def paired(a: list[float], a_seeds: list, b: list[float], b_seeds: list, alpha: float = 0.05,
           power: float = 0.8) -> dict:
    """Seed by seed: both arms of a test ran the same train.seed values (model init and data order), so a seed is a
    block and the test is on the differences d_s = a_s - b_s of the seeds both ran: the two-sided one-sample t-test
    of their mean (scipy.stats.ttest_rel), their std, the correlation of the arms over the seeds, and the MDD
    (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd_d / sqrt(n). p is None when it cannot be computed (fewer than two
    common seeds, or differences without spread)."""
    db = dict(zip(b_seeds, b))
    pairs = [(x, db[s]) for x, s in zip(a, a_seeds) if s in db]
    n = len(pairs)
    out = {"n_pairs": n, "p_paired": None, "sd_diff": math.nan, "mdd_paired": math.inf, "seed_corr": None}
    if n < 2:
        return out
    xs, ys = [x for x, _ in pairs], [y for _, y in pairs]
    d = [x - y for x, y in pairs]
    sd = statistics.stdev(d)
    out["sd_diff"] = sd
    out["mdd_paired"] = float((sps.t.ppf(1 - alpha / 2, n - 1) + sps.t.ppf(power, n - 1)) * sd / math.sqrt(n))
    if sd > 0:
        out["p_paired"] = float(sps.ttest_rel(xs, ys).pvalue)
    if statistics.pvariance(xs) > 0 and statistics.pvariance(ys) > 0:
        out["seed_corr"] = float(statistics.correlation(xs, ys))
    return out


def binomial_se(p: float, n: int) -> float:
    """The sampling error of an accuracy p measured on n items: sqrt(p (1 - p) / n)."""
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def mean_se(ses: list[float]) -> float:
    """The standard error of the mean of independent task scores: sqrt(sum se_t^2) / T."""
    return math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else math.nan


def split_sizes(data_dir: Path, tasks) -> dict[str, int]:
    """task -> number of samples of its synthetic test split (distinct keys of the wds shards under
    <data>/eval/<task>/test); tasks without such a split are left out."""
    out = {}
    for t in tasks:
        keys = set()
        for shard in sorted((Path(data_dir) / "eval" / t / "test").glob("*.tar")):
            with tarfile.open(shard) as tar:
                keys.update(m.name.rsplit("/", 1)[-1].split(".", 1)[0] for m in tar.getmembers() if m.isfile())
        if keys:
            out[t] = len(keys)
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def mechanisms(train_json: Path, pseudo_labels_json: Path) -> dict:
    """The mechanism measurements of one run: each step series of metrics/train.json's `mechanisms` as its final
    value and its mean over the logged steps where it was defined (a step with nothing to measure, e.g. nothing
    mined, holds None), and metrics/pseudo_labels.json's `omitted_concepts` numbers. What the files do not hold is
    absent."""
    out = {}
    for name, series in (_read_json(train_json).get("mechanisms") or {}).items():
        vals = {k: [x for x in v if x is not None] for k, v in series.items() if k != "steps" and isinstance(v, list)}
        out[name] = {k: {"final": float(v[-1]), "mean": statistics.fmean(v)} for k, v in vals.items() if v}
    omitted = _read_json(pseudo_labels_json).get("omitted_concepts")
    if omitted:
        out["omitted_concepts"] = {k: float(v) for k, v in omitted.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def _mean_mechanisms(records: list[dict]) -> dict:
    """Each measurement's values averaged over the seeds that have it; "absent" where no seed has it."""
    out: dict = {}
    for name in MECHANISMS + tuple(sorted({n for r in records for n in r.get("mechanisms", {})} - set(MECHANISMS))):
        got = [r["mechanisms"][name] for r in records if name in r.get("mechanisms", {})]
        if not got:
            out[name] = "absent"
            continue
        leaves: dict = {}
        for m in got:
            for k, v in m.items():
                for stat, x in (v.items() if isinstance(v, dict) else [("value", v)]):
                    leaves.setdefault(k, {}).setdefault(stat, []).append(x)
        out[name] = {k: {stat: statistics.fmean(xs) for stat, xs in st.items()} for k, st in leaves.items()}
        out[name]["seeds"] = len(got)
    return out


def _arm_stats(rs: list[dict]) -> dict:
    tasks = sorted({t for r in rs for t in r["main"]})
    arm = {"tasks": {t: _stats([r["main"][t] for r in rs if t in r["main"]]) for t in tasks},
           "mean_main": _stats([r["mean_main"] for r in rs]), "seeds": [r["seed"] for r in rs]}
    sizes = {t: n for r in rs for t, n in (r.get("eval_n") or {}).items()}
    ses = {t: binomial_se(min(max(arm["tasks"][t]["mean"], 0.0), 1.0), sizes[t]) for t in tasks if t in sizes}
    for t, se in ses.items():
        arm["tasks"][t].update({"eval_n": sizes[t], "eval_se": se})
    se = mean_se(list(ses.values())) if ses and len(ses) == len(tasks) else None
    seed_std = arm["mean_main"]["std"]
    arm["sampling"] = {"eval_se_of_mean": se, "seed_std_of_mean": seed_std,
                       "eval_se_not_well_below_seed_std": None if se is None else bool(se >= WELL_BELOW * seed_std)}
    arm["mechanisms"] = _mean_mechanisms(rs)
    return arm


TEST_KEYS = ("comparison", "kind", "world", "value", "default", "key", "baseline", "component")  # what plan() sets


def _test(t: dict, arms: dict) -> dict:
    a, b = arms[t["component"]], arms[t["baseline"]]
    base, comp = b["mean_main"], a["mean_main"]
    sd = pooled_std(comp["values"], base["values"])
    return {**t, "baseline_mean": base["mean"], "component_mean": comp["mean"], "delta": comp["mean"] - base["mean"],
            **paired(comp["values"], a["seeds"], base["values"], b["seeds"]),
            "p": welch_p(comp["values"], base["values"]), "pooled_seed_std": sd,
            "mdd": min_detectable_difference(sd, comp["n"], base["n"]),
            "per_task": {task: {"delta": a["tasks"][task]["mean"] - b["tasks"][task]["mean"],
                                **paired(*_task_seeds(a, task), *_task_seeds(b, task))}
                         for task in a["tasks"] if task in b["tasks"]}}


def _task_seeds(arm: dict, task: str) -> tuple[list[float], list]:
    """A task's values and their seeds; no seeds (so no pairs) when some seed of the arm lacks the task."""
    values = arm["tasks"][task]["values"]
    return values, (arm["seeds"] if len(values) == len(arm["seeds"]) else [])


def aggregate(results: list[dict], tests: list[dict], mode: str, params: Params | None = None) -> dict:
    """Per arm: mean +- std over seeds per task and of the task mean, the evaluation's sampling error beside the
    seed spread, the mechanism measurements. Per test (comparisons in both worlds, sweep points): the difference of
    means; the paired t-test over the seeds (p_paired, its Holm p over every test reported, its MDD: what the
    verdicts use) and Welch's beside it (p, p_holm, mdd; 80% power, alpha 0.05 two-sided). Per comparison: whether
    the effect is significant with the premise on and vanishes with it off."""
    arms = {name: _arm_stats([r for r in results if r["arm"] == name])
            for name in dict.fromkeys(r["arm"] for r in results)}
    chance = {t: v for r in results for t, v in r["chance"].items() if v is not None}
    samples = params.ablation.steps * params.ablation.batch_size if params is not None else None
    return _report(arms, tests, chance, mode, samples)


def retest(report: dict) -> dict:
    """A stored report's tests, verdicts and table computed again from its arms (their per-seed values and seeds)
    with this module's statistics: for reports written before a statistic was added. Nothing is rerun."""
    missing = [k for k in ("arms", "comparisons", "sweeps", "chance", "mode") if k not in report]
    if missing:
        raise ValueError(f"not an ablation report of this format (no {', '.join(missing)}): run its grid again")
    tests = [{k: t[k] for k in TEST_KEYS if k in t} for t in report_tests(report)]
    return _report(report["arms"], tests, report["chance"], report["mode"], report.get("samples_seen"),
                   {k: report[k] for k in report if k not in REPORT_KEYS})


def report_tests(report: dict) -> list[dict]:
    """Every test of a report: each comparison in its worlds, then each sweep point."""
    return ([t for c in report["comparisons"].values() for t in c.values() if isinstance(t, dict)]
            + [t for s in report["sweeps"].values() for t in s["points"]])


def label(t: dict) -> str:
    """`<comparison>: <world>` or `<sweep> = <value>`."""
    return f"{t['comparison']}: {t['world']}" if t["kind"] == "comparison" else f"{t['comparison']} = {fmt(t['value'])}"


def _by_seed(arm: dict) -> dict:
    """seed -> (task mean, {task: value}) of an arm (a task's values only where every seed has it)."""
    tasks = {t: dict(zip(*_task_seeds(arm, t)[::-1])) for t in arm["tasks"]}
    return {s: (v, {t: vs[s] for t, vs in tasks.items() if s in vs})
            for s, v in zip(arm["seeds"], arm["mean_main"]["values"])}


def compare(ref: dict, new: dict, z_max: float = 3.0) -> dict:
    """Whether `new` (a rerun of a grid: another clone, machine or version) reproduces `ref`. Per arm in both: the
    task means' difference and z = diff / sqrt(se_ref^2 + se_new^2), se = seed std / sqrt(n), and whether every
    seed's value is equal. Per test in both: Δ in each, and whether the verdict (paired Holm p < 0.05, and Δ's
    sign then: a hard cut, so a p of 0.049 against 0.051 counts as a difference) agrees, both reports tested with
    this version's statistics (retest). `reproduced`: "identical" (every value equal), "within noise" (every
    |z| < z_max and every verdict agrees) or "no".

    A partial rerun (every arm, some of the reference's seeds: ``--set "ablation.seeds=[0]"``) is compared seed by
    seed against the reference's same seeds: "identical" (every value of the seeds rerun) or "no", with each arm's
    largest seed difference. A seed rerun is not a new draw, so the seeds' spread is no yardstick for it (z is
    None), and the verdicts need every seed; neither is compared."""
    arms = {}
    for name in [n for n in ref["arms"] if n in new["arms"]]:
        ra, na = ref["arms"][name], new["arms"][name]
        a, b = ra["mean_main"], na["mean_main"]
        rs, ns = _by_seed(ra), _by_seed(na)
        common = [s for s in ns if s in rs]
        diffs = {s: ns[s][0] - rs[s][0] for s in common}
        partial = set(ns) < set(rs)
        identical = bool(common) and set(ns) <= set(rs) and all(ns[s] == rs[s] for s in common)
        if partial:  # the reference's same seeds, the largest seed difference, no z
            ref_mean = statistics.fmean(rs[s][0] for s in common) if common else math.nan
            new_mean = statistics.fmean(ns[s][0] for s in common) if common else math.nan
            arms[name] = {"ref": ref_mean, "new": new_mean, "diff": max(diffs.values(), key=abs, default=math.nan),
                          "z": None, "seeds": common, "partial": True, "seed_diffs": diffs, "identical": identical}
            continue
        diff, se = b["mean"] - a["mean"], math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
        arms[name] = {"ref": a["mean"], "new": b["mean"], "diff": diff, "seeds": common, "partial": False,
                      "seed_diffs": diffs, "z": diff / se if se > 0 else (0.0 if diff == 0 else math.inf),
                      "identical": identical}
    partial = any(a["partial"] for a in arms.values())
    ref, new = retest(ref), retest(new)  # one version's statistics on both (a report may come from an older clone)
    verdict = lambda t: 0 if t["p_paired_holm"] is None or t["p_paired_holm"] >= 0.05 else (1 if t["delta"] > 0 else -1)
    rt, nt = ({label(t): t for t in report_tests(r)} for r in (ref, new))
    tests = {} if partial else {
        k: {"ref_delta": rt[k]["delta"], "new_delta": nt[k]["delta"], "ref_verdict": verdict(rt[k]),
            "new_verdict": verdict(nt[k]), "agree": verdict(rt[k]) == verdict(nt[k])} for k in rt if k in nt}
    missing = sorted(set(ref["arms"]) ^ set(new["arms"])) + sorted(set(rt) ^ set(nt))
    if missing or not arms:
        reproduced = "no"
    elif all(a["identical"] for a in arms.values()):
        reproduced = "identical"
    elif not partial and all(abs(a["z"]) < z_max for a in arms.values()) and all(t["agree"] for t in tests.values()):
        reproduced = "within noise"
    else:
        reproduced = "no"
    return {"reproduced": reproduced, "z_max": z_max, "partial": partial, "arms": arms, "tests": tests,
            "only_in_one": missing}


def compare_table(c: dict) -> str:
    """compare() as markdown: the arms, then the tests whose verdicts differ."""
    out = [f"reproduced: **{c['reproduced']}** (|z| < {c['z_max']:g} on every arm and every verdict equal, or every "
           "value identical)"]
    if c.get("partial"):
        out += ["", "a partial rerun (some of the reference's seeds): against the reference's same seeds, diff = each "
                "arm's largest seed difference; identical or not (no z, no verdicts)"]
    out += ["", "| arm | seeds | reference | rerun | diff | z | identical |", "|---|---|---|---|---|---|---|"]
    out += [f"| {n} | {','.join(map(str, a['seeds']))} | {a['ref']:.4f} | {a['new']:.4f} | {a['diff']:+.4f} | "
            f"{'–' if a['z'] is None else format(a['z'], '+.2f')} | {'yes' if a['identical'] else 'no'} |"
            for n, a in c["arms"].items()]
    if not c.get("partial"):
        differ = {k: t for k, t in c["tests"].items() if not t["agree"]}
        out += ["", f"tests whose verdict differs: {len(differ)} of {len(c['tests'])}"]
        out += [f"- {k}: Δ {t['ref_delta']:+.3f} -> {t['new_delta']:+.3f}" for k, t in differ.items()]
    if c["only_in_one"]:
        out += ["", "only in one of the reports: " + ", ".join(c["only_in_one"])]
    return "\n".join(out)


REPORT_KEYS = ("mode", "arms", "comparisons", "sweeps", "chance", "tests", "correction", "sampling_check", "formulas",
               "samples_seen", "table")


def _report(arms: dict, tests: list[dict], chance: dict, mode: str, samples_seen: int | None,
            extra: dict | None = None) -> dict:
    done = [_test(t, arms) for t in tests if t["baseline"] in arms and t["component"] in arms]
    for t, ph, pp in zip(done, holm([t["p"] for t in done]), holm([t["p_paired"] for t in done])):
        t["p_holm"], t["p_paired_holm"] = ph, pp
    per_task = [m for t in done for m in t["per_task"].values()]  # a family of their own: every test x task
    for m, pp in zip(per_task, holm([m["p_paired"] for m in per_task])):
        m["p_paired_holm"] = pp
    comparisons: dict = {}
    controlled = {t["comparison"] for t in tests if t["world"] == "premise off"}
    for t in done:
        if t["kind"] == "comparison":
            comparisons.setdefault(t["comparison"], {})[t["world"]] = t
    for name, c in comparisons.items():
        on, off = c.get("premise on"), c.get("premise off")
        c["better_with_premise"] = bool(on and on["delta"] > 0 and on["p_paired_holm"] is not None
                                        and on["p_paired_holm"] < 0.05)
        # "vanishes": no significant difference in the control world (raw p, the stricter reading), and one
        # no larger than the control could detect
        c["vanishes_without_premise"] = bool(off and off["n_pairs"] >= 2
                                             and (off["p_paired"] is None or off["p_paired"] >= 0.05)
                                             and abs(off["delta"]) <= off["mdd_paired"])  # <=: identical arms vanish
        if name not in controlled:
            c["vanishes_without_premise"] = None  # no control world planned
    sweeps: dict = {}
    for t in done:
        if t["kind"] == "sweep":
            sweeps.setdefault(t["comparison"], {"key": t["key"], "default": t["default"], "points": []})["points"].append(t)
    flagged = sorted(n for n, a in arms.items() if a["sampling"]["eval_se_not_well_below_seed_std"])
    report = {"mode": mode, "arms": arms, "comparisons": comparisons, "sweeps": sweeps, "chance": chance,
              "tests": len(done), "correction": "holm",
              "sampling_check": {"arms_with_eval_se_not_well_below_seed_std": flagged, "threshold": WELL_BELOW},
              "formulas": FORMULAS, **(extra or {})}
    if samples_seen is not None:
        report["samples_seen"] = samples_seen
    report["table"] = markdown(report)
    return report


FORMULAS = {
    "delta": "mean over seeds of the component's task mean minus the baseline's",
    "p_paired": "the paired two-sided t-test of the task means over the seeds both arms ran (scipy.stats.ttest_rel; "
                "a seed fixes model init and data order in both arms): what the verdicts use",
    "p_paired_holm": "Holm's step-down correction of p_paired over every test reported",
    "mdd_paired": "(t_{0.975,n-1} + t_{0.80,n-1}) * sd_d / sqrt(n), sd_d the std of the n seeds' differences",
    "seed_corr": "Pearson's correlation of the two arms' task means over their common seeds",
    "per_task": "each task's Δ and paired test (p_paired, mdd_paired) of the same arms; p_paired_holm there is Holm's "
                "over every test x task of the report (a family apart from the task means'); what a component "
                "changes, not the verdicts",
    "p": "Welch's two-sided t-test of the seeds' task means (scipy.stats.ttest_ind, equal_var=False), unpaired",
    "p_holm": "Holm's step-down correction over every test reported (comparisons in both worlds, sweep points)",
    "mdd": "(t_{0.975,df} + t_{0.80,df}) * s_pooled * sqrt(1/n_a + 1/n_b), df = n_a + n_b - 2: the difference "
           "detected with 80% power at alpha 0.05 two-sided, unpaired",
    "eval_se": "per task sqrt(p (1 - p) / n), n the eval split's size; of the task mean sqrt(sum se_t^2) / T",
    "flag": f"eval_se_of_mean >= {WELL_BELOW} * seed std of the task mean",
}


def _p(p) -> str:
    return "–" if p is None else f"{p:.3g}"


def _cells(t: dict) -> str:
    r = "–" if t["seed_corr"] is None else f"{t['seed_corr']:.2f}"
    return (f"{_p(t['p_paired'])} | {_p(t['p_paired_holm'])} | {t['mdd_paired']:.3f} | {r} | {_p(t['p'])} "
            f"| {_p(t['p_holm'])} | {t['mdd']:.3f}")


def markdown(report: dict) -> str:
    """One table per comparison (premise on | off), one per sweep, the arms (tasks, seed std, eval SE) and the
    mechanism measurements."""
    out = []
    head = ("| world | baseline | component | Δ | p paired | Holm paired | MDD paired | r | p Welch | Holm Welch | MDD Welch |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    for name, c in report["comparisons"].items():
        rows = [f"| {w} | {t['baseline']} {t['baseline_mean']:.3f} | {t['component']} {t['component_mean']:.3f} "
                f"| {t['delta']:+.3f} | {_cells(t)} |" for w, t in c.items() if isinstance(t, dict)]
        vanishes = c["vanishes_without_premise"]
        verdict = (f"beats its baseline with the premise (paired Holm p < 0.05): {'yes' if c['better_with_premise'] else 'no'}; "
                   + ("no control world" if vanishes is None else
                      f"difference vanishes without it: {'yes' if vanishes else 'no'}"))
        out += [f"**{name}** ({verdict})", "", head, *rows, ""]
    for name, s in report["sweeps"].items():
        out += [f"**{name}** ({s['key']}, vs {fmt(s['default'])})", "",
                "| value | Δ | p paired | Holm paired | MDD paired | r | p Welch | Holm Welch | MDD Welch |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {fmt(t['value'])} | {t['delta']:+.3f} | {_cells(t)} |" for t in s["points"]]
        out.append("")
    out += _per_task_table(report)
    arms = report["arms"]
    tasks = sorted({t for a in arms.values() for t in a["tasks"]})
    head = ("| arm | seeds | " + " | ".join(t.replace("synthetic_", "") for t in tasks)
            + " | mean | eval SE of mean | flag |")
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for name, a in arms.items():
        cells = [f"{a['tasks'][t]['mean']:.3f} ± {a['tasks'][t]['std']:.3f}" if t in a["tasks"] else "–" for t in tasks]
        se = a["sampling"]["eval_se_of_mean"]
        flag = "SE ≥ spread/2" if a["sampling"]["eval_se_not_well_below_seed_std"] else ""
        out.append(f"| {name} | {a['mean_main']['n']} | " + " | ".join(cells)
                   + f" | {a['mean_main']['mean']:.3f} ± {a['mean_main']['std']:.3f} | "
                   + ("–" if se is None else f"{se:.3f}") + f" | {flag} |")
    if report["chance"]:
        out.append("| chance | | " + " | ".join(f"{report['chance'].get(t, float('nan')):.3f}" for t in tasks)
                   + " | | | |")
    out += ["", "| arm | " + " | ".join(MECHANISMS) + " |", "|---|" + "---|" * len(MECHANISMS)]
    for name, a in arms.items():
        out.append(f"| {name} | " + " | ".join(_mechanism_cell(a["mechanisms"].get(m, "absent")) for m in MECHANISMS)
                   + " |")
    return "\n".join(out)


def _per_task_table(report: dict) -> list[str]:
    """Per test, each task's Δ with its paired p (* where its Holm p over every test x task is < 0.05)."""
    tests = report_tests(report)
    tasks = sorted({k for t in tests for k in t.get("per_task", {})})
    if not tasks:
        return []
    out = ["Per task, Δ (paired p; * Holm p < 0.05 over every test x task):", "",
           "| test | " + " | ".join(k.replace("synthetic_", "") for k in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for t in tests:
        cells = []
        for k in tasks:
            m = t["per_task"].get(k)
            star = "*" if m and m.get("p_paired_holm") is not None and m["p_paired_holm"] < 0.05 else ""
            cells.append("–" if m is None else f"{m['delta']:+.3f} ({_p(m['p_paired'])}){star}")
        out.append(f"| {label(t)} | " + " | ".join(cells) + " |")
    return out + [""]


def _mechanism_cell(m) -> str:
    if m == "absent":
        return "absent"
    return ", ".join(f"{k} {v.get('final', v.get('value', math.nan)):.3f}" for k, v in m.items() if isinstance(v, dict))


def write_report(report: dict, json_path: Path, plot_stem: Path) -> list[Path]:
    """metrics JSON, a CSV for DVC plots, a PNG per arm (mean +- std, one panel per task + the mean) and a PNG of
    the tests (Δ of each comparison in both worlds and of each sweep point, with its MDD)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    plot_stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    arms = report["arms"]
    tasks = sorted({t for a in arms.values() for t in a["tasks"]})
    rows = ["arm,task,mean,std"] + [f"\"{n}\",{t},{a['tasks'][t]['mean']:.6f},{a['tasks'][t]['std']:.6f}"
                                    for n, a in arms.items() for t in tasks if t in a["tasks"]]
    rows += [f"\"{n}\",mean,{a['mean_main']['mean']:.6f},{a['mean_main']['std']:.6f}" for n, a in arms.items()]
    csv = plot_stem.with_suffix(".csv")
    atomic_write_text(csv, "\n".join(rows) + "\n")
    png = plot_stem.with_suffix(".png")
    save_figure(_arms_figure(report, tasks), png)
    effects = plot_stem.with_name(plot_stem.name + "_effects.png")
    save_figure(_effects_figure(report), effects)
    return [json_path, csv, png, effects]


def _arms_figure(report: dict, tasks: list[str]):
    plt = pyplot()
    arms = report["arms"]
    panels = tasks + ["mean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 4.2), sharey=False)
    names = list(arms)
    for ax, t in zip(axes, panels):
        st = [arms[n]["mean_main"] if t == "mean" else arms[n]["tasks"].get(t) for n in names]
        ax.bar(range(len(names)), [s["mean"] if s else 0 for s in st], yerr=[s["std"] if s else 0 for s in st],
               capsize=2, color="tab:blue", alpha=0.7)
        for i, s in enumerate(st):
            if s:
                ax.plot([i] * len(s["values"]), s["values"], "k.", ms=2)
        if t in report["chance"]:
            ax.axhline(report["chance"][t], color="gray", ls="--", lw=1)
        ax.set_title(t.replace("synthetic_", ""))
        ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=5)
    fig.suptitle(f"ablation ({report['mode']}): mean ± std over seeds (dots: seeds; dashed: chance)", fontsize=9)
    return fig


def _effects_figure(report: dict):
    """Δ of the task mean per test, ± its paired MDD (grey); filled: paired Holm p < 0.05."""
    plt = pyplot()
    tests = report_tests(report)
    labels = [label(t) for t in tests]
    fig, ax = plt.subplots(figsize=(6.5, 0.35 * len(tests) + 1.2))
    for i, t in enumerate(tests):
        mdd = t["mdd_paired"] if math.isfinite(t["mdd_paired"]) else 0.0
        ax.barh(i, 2 * mdd, left=-mdd, color="0.85", height=0.6)
        sig = t["p_paired_holm"] is not None and t["p_paired_holm"] < 0.05
        ax.plot(t["delta"], i, "o", color="tab:red" if sig else "tab:blue", mfc=None if sig else "white")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(tests)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("Δ task mean vs baseline (grey: ± paired minimum detectable difference; red: paired Holm p < 0.05)")
    fig.suptitle(f"ablation ({report['mode']}): effects", fontsize=9)
    return fig


def dvc_queue_commands(params: Params) -> list[list[str]]:
    """`dvc exp run --queue -n <arm>-s<seed> -S <key>=<value> ...` for every run of the grid: its train overrides
    and its world / upstream overrides (download.world.*, cat_filter.*, pseudo_labels.*), so DVC reruns the
    upstream stages an arm changes (then `dvc queue start` or `dvc exp run --run-all`; `dvc exp show`)."""
    a = params.ablation
    arms, _ = plan(params)
    cmds = []
    for name, arm in arms.items():
        for seed in a.seeds:
            ov = deep_merge(deep_merge(a.full, arm["overrides"]),
                            {"train": {"steps": a.steps, "batch_size": a.batch_size, "seed": seed}})
            cmd = ["dvc", "exp", "run", "--queue", "-n", f"{dvc_name(name)}-s{seed}"]
            for k, v in flat(ov):
                cmd += ["-S", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
            cmds.append(cmd)
    return cmds


def dvc_name(arm: str) -> str:
    """An experiment name (a git ref) of an arm's name."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", arm).strip("-")


def flat(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of nested overrides."""
    out = []
    for k, v in tree.items():
        out += flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return out


def run_record(name: str, seed: int, overrides: dict, trained: dict, bench: dict, run_id: str,
               eval_n: dict | None = None, measured: dict | None = None) -> dict:
    """What the report keeps of one run (and what marks it done: the digest of its overrides): the benchmark's
    main metrics, the eval splits' sizes, the mechanism measurements."""
    return {"arm": name, "seed": seed, "digest": digest(overrides), "main": main_metrics(bench),
            "mean_main": bench["mean_main"], "chance": {t: r.get("chance") for t, r in bench["tasks"].items()},
            "final_loss": trained["final_loss"], "run_id": run_id, "eval_n": eval_n or {},
            "mechanisms": measured or {}}


def main_metrics(bench: dict) -> dict:
    """task -> main metric of the benchmark stage's metrics (the tasks that ran)."""
    return {t: r["main"] for t, r in bench["tasks"].items() if r.get("main") is not None}
