"""Results of `bench/run.py`: the JSON schema, the markdown tables, the PNG plots and `--compare`.

One JSON document per run:
    {"schema": SCHEMA, "kind": "gpu" | "e2e" | "cpu" | "static",
     "env": {gpu, driver, torch, triton, cuda, python, git_commit, date, argv},
     "limits": {copy_gbps, matmul_tflops}            (gpu: measured at the start of the same run)
     "rows": [kernel rows], "e2e": [end-to-end rows], "cpu": [cpu rows], "static": {...}}
A kernel row: op, variant, mode, provider, role ("baseline" | "ours"), status ("ok" | "unavailable" |
"error"), reason, and when ok: ms (do_bench median), ms_p20, ms_p80, then either ms_graph,
ms_graph_p20, ms_graph_p80 and graph {calls, input_sets, replays} (device-only, CUDA-graph replay) or
graph_reason (why not), timing_basis ("graph" | "do_bench": the time that gbps, tflops and
pct_of_limit use), bytes, flops, gbps, tflops, bound, pct_of_limit, peak_mem_bytes, and for ours
speedup {baseline: x} with speedup_basis {baseline: "graph" | "do_bench"}.
Schema 3: gbps, tflops and pct_of_limit may be null with pct_reason, speedup and speedup_basis null
with speedup_reason (the fwd and bwd rows of a provider that computes the gradient in its forward:
only its fwd+bwd compares); peak_mem_bytes of a bwd row is the backward alone, above what an untimed
forward left allocated (settings.peak_mem; schema 2 measured fwd+bwd there).
Schemas 1 (no graph timings) and 2 still load; --compare uses ms_graph where both files have it.
"""
import json
import math

SCHEMA = "gpt2-kernel-lab/bench/3"
OLD_SCHEMAS = ("gpt2-kernel-lab/bench/1", "gpt2-kernel-lab/bench/2")  # read (validate, --compare), never written
KINDS = ("gpu", "e2e", "cpu", "static")
ENV_KEYS = ("gpu", "driver", "torch", "triton", "cuda", "python", "git_commit", "date")
ROW_KEYS = ("op", "variant", "mode", "provider", "role", "status")
ROW_OK_KEYS = ("ms", "ms_p20", "ms_p80", "bytes", "flops", "gbps", "tflops", "pct_of_limit", "bound", "peak_mem_bytes")
ROW_OK_KEYS_GRAPHS = ("timing_basis",)  # schema 2 on
OURS_OK_KEYS = ("speedup",)
OURS_OK_KEYS_GRAPHS = ("speedup_basis",)  # schema 2 on
BASES = ("graph", "do_bench")
E2E_KEYS = ("name", "spec", "compile", "status")
E2E_OK_KEYS = ("tokens_per_sec", "mfu", "peak_mem_bytes", "loss", "steps_measured")
SLOWER = 1.05  # --compare flags anything more than 5% slower


def validate(doc):
    """Problems with a results document (empty list = valid)."""
    p = []
    if not isinstance(doc, dict):
        return ["document is not a JSON object"]
    if doc.get("schema") != SCHEMA and doc.get("schema") not in OLD_SCHEMAS:
        p.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    version = _version(doc.get("schema"))
    v2 = version >= 2  # graph timings: timing_basis, speedup_basis, ms_graph or graph_reason
    if doc.get("kind") not in KINDS:
        p.append(f"kind {doc.get('kind')!r} not in {KINDS}")
    env = doc.get("env")
    if not isinstance(env, dict):
        p.append("env missing")
    else:
        p += [f"env.{k} missing" for k in ENV_KEYS if k not in env]
    if doc.get("kind") == "gpu":
        limits = doc.get("limits") or {}
        for k in ("copy_gbps", "matmul_tflops"):
            if not _positive(limits.get(k)):
                p.append(f"limits.{k} must be a positive number, got {limits.get(k)!r}")
    for i, r in enumerate(doc.get("rows", [])):
        where = f"rows[{i}] ({r.get('op')} {r.get('variant')} {r.get('mode')} {r.get('provider')})"
        p += [f"{where}: {k} missing" for k in ROW_KEYS if k not in r]
        if r.get("status") == "ok":
            p += [f"{where}: {k} missing" for k in ROW_OK_KEYS + (ROW_OK_KEYS_GRAPHS if v2 else ()) if k not in r]
            p += _check_rates_and_speedups(r, where, version)
            ms, lo, hi = r.get("ms"), r.get("ms_p20"), r.get("ms_p80")
            if not all(_positive(x) for x in (ms, lo, hi)) or not lo <= ms <= hi:
                p.append(f"{where}: need 0 < ms_p20 <= ms <= ms_p80, got {lo}, {ms}, {hi}")
            if "ms_graph" in r:
                g, glo, ghi = r.get("ms_graph"), r.get("ms_graph_p20"), r.get("ms_graph_p80")
                if not all(_positive(x) for x in (g, glo, ghi)) or not glo <= g <= ghi:
                    p.append(f"{where}: need 0 < ms_graph_p20 <= ms_graph <= ms_graph_p80, got {glo}, {g}, {ghi}")
                if r.get("timing_basis") != "graph":
                    p.append(f"{where}: has ms_graph but timing_basis is {r.get('timing_basis')!r}")
            elif v2 and not r.get("graph_reason"):
                p.append(f"{where}: neither ms_graph nor graph_reason")
        elif r.get("status") in ("unavailable", "error"):
            if not r.get("reason"):
                p.append(f"{where}: status {r['status']} without a reason")
        else:
            p.append(f"{where}: status {r.get('status')!r} not ok/unavailable/error")
    for i, r in enumerate(doc.get("e2e", [])):
        where = f"e2e[{i}] ({r.get('name')})"
        p += [f"{where}: {k} missing" for k in E2E_KEYS if k not in r]
        if r.get("status") == "ok":
            p += [f"{where}: {k} missing" for k in E2E_OK_KEYS if k not in r]
            if not _positive(r.get("tokens_per_sec")):
                p.append(f"{where}: tokens_per_sec must be positive")
        elif not r.get("reason"):
            p.append(f"{where}: status {r.get('status')!r} without a reason")
    return p


def _version(schema):
    """1, 2, 3... from "gpt2-kernel-lab/bench/N"; 0 if unknown."""
    head, _, n = str(schema).rpartition("/")
    return int(n) if head == "gpt2-kernel-lab/bench" and n.isdigit() else 0


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_rates_and_speedups(r, where, version):
    """An ok row's rates, timing basis, peak memory and (ours) speedups: numbers, or (schema 3) null
    with a reason."""
    p = []
    v2, v3 = version >= 2, version >= 3
    if v2 and "timing_basis" in r and r["timing_basis"] not in BASES:
        p.append(f"{where}: timing_basis {r['timing_basis']!r} not in {BASES}")
    if "peak_mem_bytes" in r and not (_number(r["peak_mem_bytes"]) or r["peak_mem_bytes"] is None):
        p.append(f"{where}: peak_mem_bytes must be a number, got {r['peak_mem_bytes']!r}")
    rates = [k for k in ("gbps", "tflops", "pct_of_limit") if k in r]
    nulls = [k for k in rates if r[k] is None]
    if nulls and not (v3 and r.get("pct_reason")):
        p.append(f"{where}: {', '.join(nulls)} null without pct_reason" + ("" if v3 else " (schema 3 only)"))
    p += [f"{where}: {k} must be a number, got {r[k]!r}" for k in rates if r[k] is not None and not _number(r[k])]
    if r.get("role") != "ours":
        return p
    p += [f"{where}: {k} missing (ours)" for k in OURS_OK_KEYS + (OURS_OK_KEYS_GRAPHS if v2 else ()) if k not in r]
    sp, basis = r.get("speedup"), r.get("speedup_basis")
    if "speedup" in r and sp is None:
        if not (v3 and r.get("speedup_reason")):
            p.append(f"{where}: speedup null without speedup_reason" + ("" if v3 else " (schema 3 only)"))
        if v2 and basis is not None:
            p.append(f"{where}: speedup null but speedup_basis is {basis!r}")
    elif "speedup" in r:
        if not isinstance(sp, dict) or not all(_positive(x) for x in sp.values()):
            p.append(f"{where}: speedup must map baselines to positive numbers, got {sp!r}")
        elif v2 and "speedup_basis" in r and (not isinstance(basis, dict) or set(basis) != set(sp)
                                               or not set(basis.values()) <= set(BASES)):
            p.append(f"{where}: speedup_basis {basis!r} must give {BASES} for each baseline of speedup")
    return p


def _positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def load(path):
    with open(path) as f:
        doc = json.load(f)
    problems = validate(doc)
    if problems:
        raise ValueError(f"{path}: not a bench result:\n  " + "\n  ".join(problems[:20]))
    return doc


# ---- markdown ----------------------------------------------------------------------------------

def _key(r):
    return (r["op"], r["variant"], r["mode"], r["provider"])


def env_line(doc):
    e = doc["env"]
    return (f"{e['gpu']} (driver {e['driver']}), torch {e['torch']}, triton {e['triton']}, CUDA {e['cuda']}, "
            f"commit {e['git_commit']}, {e['date']}")


def markdown(doc):
    out = [f"### {'Kernel timings' if doc.get('rows') else 'Results'}: {env_line(doc)}"]
    lim = doc.get("limits")
    if lim:
        out.append(f"Measured limits: copy {lim['copy_gbps']:.0f} GB/s, bf16 matmul {lim['matmul_tflops']:.0f} TFLOP/s. "
                   "ms: triton do_bench around one eager call, median [p20, p80]: includes host launch time "
                   "(Python, dispatch, autograd) when the GPU outruns the CPU. ms_graph: device-only, many calls "
                   "captured in one CUDA graph and replayed, median [p20, p80] per call (inputs rotated so they "
                   "are not re-read from L2). GB/s, TFLOP/s, % of limit and speedups use ms_graph when the row "
                   "has it, else ms (marked *). % = achieved GB/s (memory-bound) or TFLOP/s (compute-bound) of "
                   "the measured limit, against the op's ideal bytes / FLOPs. The fused losses (cross_entropy, "
                   "linear_cross_entropy) compute their gradient in the forward: their fwd and bwd rows show "
                   "times only (n/a), compare them on fwd+bwd. peak MiB: allocated above the inputs during one "
                   "call; bwd: the backward alone, above what the forward before it left allocated.")
    groups = {}
    for r in doc.get("rows", []):
        groups.setdefault((r["op"], r["variant"]), []).append(r)
    for (op, variant), rows in groups.items():
        out += ["", f"**{op}** {variant}", "",
                "| mode | provider | ms (do_bench) | ms_graph | GB/s | TFLOP/s | % limit | peak MiB | speedup vs baselines |",
                "|---|---|---|---|---|---|---|---|---|"]
        reasons = []
        for r in rows:
            if r["status"] != "ok":
                out.append(f"| {r['mode']} | {r['provider']} | {r['status']}: {_short(r.get('reason'))} | | | | | | |")
                continue
            star = "" if r.get("timing_basis") == "graph" else "*"
            if r.get("speedup") is None and r.get("speedup_reason"):
                sp = "n/a"
            else:
                sp = ", ".join(f"{b} {x:.2f}x" + ("" if (r.get("speedup_basis") or {}).get(b) == "graph" else "*")
                               for b, x in (r.get("speedup") or {}).items())
            if r.get("pct_of_limit") is None:
                gb = tf = pct = "n/a"
            else:
                gb, pct = f"{r['gbps']:.0f}{star}", f"{r['pct_of_limit']:.0f}%{star}"
                tf = f"{r['tflops']:.1f}{star}" if r.get("flops") else "-"
            for reason in (r.get("pct_reason"), r.get("speedup_reason")):
                if reason and reason not in reasons:
                    reasons.append(reason)
            mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") is not None else "-"
            if "ms_graph" in r:
                g = f"{r['ms_graph']:.3f} [{r['ms_graph_p20']:.3f}, {r['ms_graph_p80']:.3f}]"
            else:
                g = "- " + _short(r.get("graph_reason"), 60) if r.get("graph_reason") else "-"
            out.append(f"| {r['mode']} | {r['provider']} | {r['ms']:.3f} [{r['ms_p20']:.3f}, {r['ms_p80']:.3f}] | {g} "
                       f"| {gb} | {tf} | {pct} | {mem} | {sp} |")
        out += [f"n/a: {reason}" for reason in reasons]
    if doc.get("e2e"):
        out += ["", e2e_markdown(doc["e2e"])]
    return "\n".join(out)


def e2e_markdown(rows):
    out = ["**End to end** (`python -m gpt2.train`, warm-up steps excluded; medians)", "",
           "| run | tokens/s | vs torch | MFU | peak GiB | loss after last step | note |", "|---|---|---|---|---|---|---|"]
    base = next((r for r in rows if r["name"] == "torch" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['name']} | | | | | | {r['status']}: {_short(r.get('reason'))} |")
            continue
        vs = f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        mem = f"{r['peak_mem_bytes'] / 2**30:.2f}" if r.get("peak_mem_bytes") else "-"
        note = f" profiled steps failed: {_short(r['profile_error'], 80)} " if r.get("profile_error") else " "
        out.append(f"| {r['name']} | {r['tokens_per_sec']:,.0f} | {vs} | {mfu} | {mem} | {r['loss']:.4f} |{note}|")
    profiled = [r for r in rows if r["status"] == "ok" and r.get("profile")]
    if profiled:
        out += ["", "**Where a step's time goes** (the profiled steps after the timed ones, gpt2/profile.py: device "
                "time per kernel category in ms per step; GPU idle = the share of the step it waited for the host; "
                "device-bound = tokens over the GPU's busy time)", "",
                "| run | step ms | busy ms | GPU idle | device-bound tok/s | its MFU | kernels/step | "
                + " | ".join(PROFILE_COLUMNS) + " | rest |", "|---" * (8 + len(PROFILE_COLUMNS)) + "|"]
        for r in profiled:
            out.append(profile_row(r["name"], r["profile"]))
    return "\n".join(out)


PROFILE_COLUMNS = ("matmul", "attention", "layer_norm", "gelu", "cross_entropy", "optimizer", "inductor")


def profile_row(name, p):
    """One run's line of the e2e breakdown table (p: a gpt2/profile.py summary)."""
    cats = p.get("categories", {})
    ms = lambda c: f"{cats[c]['ms_per_step']:.2f}" if c in cats else "-"  # noqa: E731
    rest = sum(v["ms_per_step"] for c, v in cats.items() if c not in PROFILE_COLUMNS)
    busy, idle = p.get("device_busy_s"), p.get("device_idle_fraction")
    rate, mfu = p.get("device_bound_tokens_per_sec"), p.get("device_bound_mfu")
    return (f"| {name} | {1e3 * p['step_time_s']:.2f} | {'-' if busy is None else f'{1e3 * busy:.2f}'} | "
            f"{'-' if idle is None else f'{100 * idle:.0f}%'} | {'-' if not rate else f'{rate:,.0f}'} | "
            f"{'-' if not mfu else f'{100 * mfu:.1f}%'} | {p.get('kernels_per_step', 0):.0f} | "
            + " | ".join(ms(c) for c in PROFILE_COLUMNS) + f" | {rest:.2f} |")


def _short(text, n=100):
    text = (text or "").strip().splitlines()
    return (text[0][:n] if text else "").replace("|", "/")


# ---- plots -------------------------------------------------------------------------------------

def _label(r):
    return f"{r['op']} {r['variant']} {r['mode']}"


def strongest_baseline(r):
    """(baseline, speedup, basis, stronger_elsewhere) for an ours row: the strongest baseline (lowest
    speedup) among those compared on our row's own timing basis (device-only graph times when ours has
    one); only when there is none (every baseline fell back to do_bench), the strongest of the rest, with
    basis "do_bench". stronger_elsewhere: {baseline: speedup} of the baselines left out (compared on
    another basis) that look stronger still, to be said next to the bar. None when the row has no
    speedups (none ran, or not comparable)."""
    sp = r.get("speedup") or {}
    if not sp:
        return None
    basis = r.get("speedup_basis") or {}
    own = r.get("timing_basis", "do_bench")
    pool = {b: x for b, x in sp.items() if basis.get(b, "do_bench") == own} or sp
    best = min(pool, key=pool.get)
    elsewhere = {b: x for b, x in sp.items() if b not in pool and x < pool[best]}
    return best, pool[best], basis.get(best, "do_bench"), elsewhere


def speedup_bars(doc):
    """(labels, providers, value, note, hatched) of the speedup plot: per op, variant and mode, each of
    ours against strongest_baseline; rows with speedup null (fwd, bwd of the fused losses) are left out,
    so those ops show fwd+bwd only. note: "vs <baseline>" (and any stronger-looking baseline that
    could only be compared on do_bench); hatched: bars on do_bench's (host-inclusive) times."""
    labels, value, note, hatched = [], {}, {}, set()
    rows = [r for r in doc.get("rows", []) if r["status"] == "ok" and r["role"] == "ours"]
    for r in rows:
        best = strongest_baseline(r)
        if best is None:
            continue
        label, (name, x, basis, elsewhere) = _label(r), best
        if label not in labels:
            labels.append(label)
        value[(label, r["provider"])] = x
        note[(label, r["provider"])] = f"vs {name}" + (" (do_bench)" if basis != "graph" else "") + "".join(
            f"; {b}: {y:.2f}x on do_bench only" for b, y in elsewhere.items())
        if basis != "graph":
            hatched.add((label, r["provider"]))
    providers = sorted({p for _, p in value})
    return labels, providers, value, note, hatched


def roofline_bars(doc):
    """(labels, providers, value) of the roofline plot: pct_of_limit / 100 per row; an op, variant and
    mode with any not-comparable row (pct_of_limit null) is left out whole (the fused losses: fwd+bwd only)."""
    rows = [r for r in doc.get("rows", []) if r["status"] == "ok"]
    skip = {_label(r) for r in rows if r.get("pct_of_limit") is None}
    rows = [r for r in rows if _label(r) not in skip]
    labels = list(dict.fromkeys(_label(r) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    return labels, providers, {(_label(r), r["provider"]): r["pct_of_limit"] / 100 for r in rows}


def plots(doc, stem):
    """stem_speedup.png (ours vs the strongest baseline on the same timing basis, per op and mode) and
    stem_roofline.png (fraction of the measured limit, per provider). Returns the paths written."""
    if not any(r["status"] == "ok" for r in doc.get("rows", [])):
        return []
    gpu = doc["env"]["gpu"]
    paths = []
    labels, ours, speed, note, hatched = speedup_bars(doc)
    if labels:
        paths.append(_grouped_barh(f"{stem}_speedup.png", labels, ours, speed, 0.35,
                                   "speedup vs the strongest baseline timed the same way (x); hatched: "
                                   "do_bench times (host-inclusive), no graph-timed baseline",
                                   f"Our kernels vs the strongest baseline (fused losses: fwd+bwd only)\n{gpu}",
                                   note=note, hatched=hatched))
    labels, provs, frac = roofline_bars(doc)
    if labels:
        paths.append(_grouped_barh(f"{stem}_roofline.png", labels, provs, frac, 0.25,
                                   "fraction of the measured limit (copy GB/s or bf16 matmul TFLOP/s) at the ideal "
                                   "bytes / FLOPs", f"Fraction of roofline\n{gpu}"))
    return paths


def _grouped_barh(path, labels, groups, value, row_height, xlabel, title, note=None, hatched=()):
    """Horizontal bars: one row per label, one bar per group in it (value[(label, group)], 0 if absent),
    a line at 1.0; note[(label, group)]: text at the bar's end; hatched: (label, group) bars drawn
    hatched. Writes `path` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, row_height * len(labels) * max(1, len(groups)) + 1.5))
    h = 0.8 / max(1, len(groups))
    for j, group in enumerate(groups):
        ys = [i + j * h for i in range(len(labels))]
        xs = [value.get((lab, group), 0) for lab in labels]
        bars = ax.barh(ys, xs, height=h, label=group)
        for bar, lab, x, y in zip(bars, labels, xs, ys):
            if (lab, group) in hatched:
                bar.set_hatch("//")
            if note and (lab, group) in note:
                ax.text(x, y, " " + note[(lab, group)], va="center", fontsize=6)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([i + 0.4 - h / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- compare -----------------------------------------------------------------------------------

def compare(a, b, threshold=SLOWER):
    """(markdown, flagged): per row present in both runs, B's time over A's. Flagged: rows more than
    `threshold` slower in B, rows that ran in A but not in B, e2e runs with fewer tokens/s."""
    lines = [f"A: {env_line(a)}", f"B: {env_line(b)}", ""]
    if a["env"]["gpu"] != b["env"]["gpu"]:
        lines += [f"note: different cards ({a['env']['gpu']} vs {b['env']['gpu']}): compare with care", ""]
    flagged = []
    ra = {_key(r): r for r in a.get("rows", [])}
    rb = {_key(r): r for r in b.get("rows", [])}
    if ra or rb:
        lines += ["Times: ms_graph (device-only) where both runs have it, else do_bench's ms.", "",
                  "| op | variant | mode | provider | basis | A ms | B ms | B/A | |", "|---|---|---|---|---|---|---|---|---|"]
    for k in list(ra) + [k for k in rb if k not in ra]:
        x, y = ra.get(k), rb.get(k)
        if x is None or y is None:
            if y is None and x["status"] == "ok":
                flagged.append(f"{' '.join(k)}: ran in A, missing from B")
            lines.append(f"| {' | '.join(k)} | | {'-' if x is None else _ms(x)} | {'-' if y is None else _ms(y)} | | only in {'B' if x is None else 'A'} |")
            continue
        if x["status"] == "ok" and y["status"] == "ok":
            key = "ms_graph" if "ms_graph" in x and "ms_graph" in y else "ms"
            ratio = y[key] / x[key]
            flag = "SLOWER" if ratio > threshold else ("faster" if ratio < 1 / threshold else "")
            if flag == "SLOWER":
                flagged.append(f"{' '.join(k)}: {ratio:.2f}x the time ({'graph' if key == 'ms_graph' else 'do_bench'})")
            lines.append(f"| {' | '.join(k)} | {'graph' if key == 'ms_graph' else 'do_bench'} | {x[key]:.3f} "
                         f"| {y[key]:.3f} | {ratio:.2f} | {flag} |")
        else:
            flag = "BROKEN" if x["status"] == "ok" else ""
            if flag:
                flagged.append(f"{' '.join(k)}: ran in A, {y['status']} in B")
            lines.append(f"| {' | '.join(k)} | | {_ms(x)} | {_ms(y)} | | {flag} |")
    ea = {r["name"]: r for r in a.get("e2e", [])}
    eb = {r["name"]: r for r in b.get("e2e", [])}
    common = [n for n in ea if n in eb]
    if common:
        lines += ["", "| e2e run | A tokens/s | B tokens/s | B/A | A loss | B loss | |", "|---|---|---|---|---|---|---|"]
    for n in common:
        x, y = ea[n], eb[n]
        if x["status"] == "ok" and y["status"] == "ok":
            ratio = y["tokens_per_sec"] / x["tokens_per_sec"]
            flag = "SLOWER" if ratio < 1 / threshold else ""
            if flag:
                flagged.append(f"e2e {n}: {ratio:.2f}x the tokens/s")
            lines.append(f"| {n} | {x['tokens_per_sec']:,.0f} | {y['tokens_per_sec']:,.0f} | {ratio:.2f} "
                         f"| {x['loss']:.4f} | {y['loss']:.4f} | {flag} |")
        elif x["status"] == "ok":
            flagged.append(f"e2e {n}: ran in A, {y['status']} in B")
            lines.append(f"| {n} | {x['tokens_per_sec']:,.0f} | {y['status']} | | | | BROKEN |")
    for n in ea:
        if n not in eb and ea[n]["status"] == "ok":
            flagged.append(f"e2e {n}: ran in A, missing from B")
            lines.append(f"| {n} | {ea[n]['tokens_per_sec']:,.0f} | missing | | | | only in A |")
    lines += ["", f"{len(flagged)} flagged (more than {100 * (threshold - 1):.0f}% slower, broken or missing)"]
    lines += [f"  - {f}" for f in flagged]
    return "\n".join(lines), flagged


def _ms(r):
    return f"{r['ms']:.3f}" if r["status"] == "ok" else r["status"]
