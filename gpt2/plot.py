"""Loss curves of one or more runs as a PNG.

    python -m gpt2.plot runs/tiny-shakespeare-...               # -> runs/.../loss.png
    python -m gpt2.plot runs/a runs/b -o compare.png           # overlay runs (e.g. two --kernels specs)

Left: train loss per step (thin) and val loss (markers). Right: HellaSwag acc_norm when the runs have it.
"""
import argparse
import json
from pathlib import Path


def read_log(run):
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no log (is {run} a run folder of gpt2.train?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(runs, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {str(r): read_log(r) for r in runs}
    has_hs = any("hellaswag" in rec for log in logs.values() for rec in log)
    fig, axes = plt.subplots(1, 2 if has_hs else 1, figsize=(12 if has_hs else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for i, (name, log) in enumerate(logs.items()):
        color = f"C{i}"
        label = Path(name).name
        ax.plot([r["step"] for r in log], [r["loss"] for r in log], color=color, lw=0.8, alpha=0.7, label=f"{label} train")
        val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), color=color, marker="o", ms=3, lw=1.5, label=f"{label} val")
        if has_hs:
            hs = [(r["step"], r["hellaswag"]["acc_norm"]) for r in log if "hellaswag" in r]
            if hs:
                axes[0][1].plot(*zip(*hs), color=color, marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_hs:
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("HellaSwag acc_norm")
        axes[0][1].grid(alpha=0.3)
        axes[0][1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpt2.plot", description="Plot the loss curves of gpt2.train runs.")
    p.add_argument("runs", nargs="+", help="run folders (with log.jsonl)")
    p.add_argument("-o", "--out", default=None, help="PNG path (default: <first run>/loss.png)")
    args = p.parse_args(argv)
    from gpt2.generate import user_errors

    with user_errors(p):
        out = plot(args.runs, args.out or str(Path(args.runs[0]) / "loss.png"))
    print(out)


if __name__ == "__main__":
    main()
