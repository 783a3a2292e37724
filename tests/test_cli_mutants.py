"""Fast tests of the command-line layers that mutation testing found unguarded: gpt2.data's CLI
(--val-fraction, --shards, the shakespeare subcommand's names, fineweb's refusal order and the `datasets`
import message, DownloadError as one error line), gpt2.train's argument checks and cadences (0 = off), and
gpt2.plot's series and default output path. Every test here runs in well under two seconds."""
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from gpt2 import data as D
from gpt2 import plot, train

SMALL = ["--model", "tiny", "--n-layer", "1", "--n-head", "1", "--n-embd", "32", "--block-size", "32"]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    try:
        src = D.shakespeare_path()
    except Exception as e:  # no network and no offline copy
        pytest.skip(f"tiny Shakespeare unavailable: {e}")
    path = tmp_path_factory.mktemp("text") / "shk.txt"
    with open(src, encoding="utf-8") as f:
        path.write_text(f.read(20000))
    return str(path)


def run_args(text, out, *extra, steps=3):
    return SMALL + ["--data", text, "--out", str(out), "--device", "cpu", "--dtype", "float32", "--batch-size", "4",
                    "--seq-len", "16", "--max-steps", str(steps), "--lr", "1e-2", "--warmup-steps", "1",
                    "--eval-tokens", "64", "--quiet", *extra]


# ---- gpt2.data CLI -------------------------------------------------------------------------------

def test_cli_val_fraction_reaches_the_split(tmp_path):
    """`text --val-fraction 0.5`: half the tokens are val (a CLI that dropped the flag used 0.1)."""
    a = tmp_path / "a.txt"
    a.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    D.main(["text", str(a), "--out", str(tmp_path / "o"), "--val-fraction", "0.5"])
    n_train = D.read_header(tmp_path / "o" / "text_train_000000.bin")
    n_val = D.read_header(tmp_path / "o" / "text_val_000000.bin")
    assert n_val == round(0.5 * (n_train + n_val)) and n_val > 0.4 * (n_train + n_val)


@pytest.mark.parametrize("value", ["1", "1.0", "half"])
def test_cli_val_fraction_must_be_inside_zero_and_one(tmp_path, capsys, value):
    (tmp_path / "a.txt").write_text("some text " * 20)
    with pytest.raises(SystemExit) as e:
        D.main(["text", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--val-fraction", value])
    assert e.value.code == 2 and "--val-fraction: " in capsys.readouterr().err and not (tmp_path / "o").exists()


def eot_count(folder):
    return sum(int((D.read_shard(p) == D.EOT).sum()) for p in Path(folder).glob("*.bin"))


def test_cli_split_blank_lines_makes_one_document_per_paragraph(tmp_path):
    """Blank lines (several in a row, or CRLF ones) separate documents; empty ones are dropped; single
    newlines do not split; without --split-blank-lines a file is one document."""
    a = tmp_path / "a.txt"
    a.write_bytes(b"alpha beta\ngamma\n\n\n\ndelta epsilon\r\n\r\nzeta eta theta\n\n")
    D.main(["text", str(a), "--out", str(tmp_path / "p"), "--split-blank-lines", "--val-fraction", "0.5"])
    assert eot_count(tmp_path / "p") == 3
    D.main(["text", str(a), "--out", str(tmp_path / "f"), "--val-fraction", "0.5"])
    assert eot_count(tmp_path / "f") == 1


def test_cli_shakespeare_names_its_shards(tmp_path, capsys):
    try:
        D.shakespeare_path()
    except Exception as e:
        pytest.skip(f"tiny Shakespeare unavailable: {e}")
    D.main(["shakespeare", "--out", str(tmp_path / "s")])
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names == ["shakespeare_train_000000.bin", "shakespeare_val_000000.bin"], names
    n_train, n_val = (D.read_header(tmp_path / "s" / n) for n in names)
    assert n_val == round(0.1 * (n_train + n_val))
    assert "shakespeare_val_000000.bin: " in capsys.readouterr().out


def test_cli_download_error_is_one_error_line(tmp_path, capsys, monkeypatch):
    def offline():
        raise D.DownloadError("could not download tiny Shakespeare (offline); put a copy in GPT2_DATA_CACHE")

    monkeypatch.setattr(D, "shakespeare_path", offline)
    with pytest.raises(SystemExit) as e:
        D.main(["shakespeare", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: could not download tiny Shakespeare") and "Traceback" not in err
    assert not (tmp_path / "s").exists()


def test_fineweb_refuses_existing_shards_before_importing_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `from datasets import ...` raises ImportError
    D.write_shard(tmp_path / "edufineweb_train_000001.bin", [1, 2, 3])
    with pytest.raises(D.ShardError, match="already holds 1 shard"):
        D.prepare_fineweb(tmp_path, shards=1)


def test_fineweb_without_datasets_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r'FineWeb-Edu needs the `datasets` package: pip install -e "\.\[data\]"'):
        D.prepare_fineweb(tmp_path / "a", shards=1)
    with pytest.raises(SystemExit) as e:
        D.main(["fineweb", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: FineWeb-Edu needs the `datasets` package") and "Traceback" not in err


def test_cli_fineweb_passes_its_flags(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(D, "prepare_fineweb", lambda *a: seen.setdefault("args", a) and [])
    D.main(["fineweb", "--out", str(tmp_path), "--shards", "3", "--sample", "100BT", "--shard-tokens", "10", "--workers", "2"])
    assert seen["args"] == (str(tmp_path), 3, "100BT", 10, 2)


def test_fineweb_shards_stop_and_shard_zero_is_val(tmp_path, monkeypatch):
    """With a stand-in `datasets`: --shards 2 writes exactly two shards, the first of them val."""
    docs = [{"text": f"document number {i} says hello to the world"} for i in range(50)]
    calls = []

    def load_dataset(path, name, split, streaming):
        calls.append((path, name, split, streaming))
        return iter(docs)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    paths = D.prepare_fineweb(tmp_path, shards=2, sample="10BT", shard_tokens=20, workers=1)
    assert [p.name for p in paths] == ["edufineweb_val_000000.bin", "edufineweb_train_000001.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert [D.read_header(p) for p in paths] == [20, 20]
    assert calls == [("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)]


# ---- gpt2.train argument checks and cadences -----------------------------------------------------

@pytest.mark.parametrize("flag", ["--eval-every", "--hellaswag-every", "--sample-every", "--checkpoint-every",
                                  "--max-steps", "--sample-tokens", "--eval-tokens", "--warmup-steps", "--seed"])
def test_cadences_and_counts_refuse_negative_but_take_zero(flag):
    a = train.build_parser().parse_args([flag, "-1"])
    with pytest.raises(train.UsageError, match=f"{flag} must be >= 0, got -1"):
        train.resolve_defaults(a, torch.device("cpu"))
    z = train.build_parser().parse_args([flag, "0"])
    train.resolve_defaults(z, torch.device("cpu"))


def test_total_batch_size_counts_the_world_size(text, tmp_path):
    """B x T x world must divide --total-batch-size: 64 tokens per step are one micro-batch of one rank, but
    not a whole micro-batch of each of two ranks."""
    a = train.build_parser().parse_args(run_args(text, tmp_path / "w", "--total-batch-size", "64", "--kernels", "torch"))
    with pytest.raises(train.UsageError, match=r"--total-batch-size 64 is not a multiple of .* = 4 x 16 x 2 = 128"):
        train._train(a, 0, 2, torch.device("cpu"))


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"--resume: no ckpt_\*\.pt in"):
        train.find_resume("latest", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no ckpt_"):
        train.find_resume(str(tmp_path / "run"), None)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file or run folder"):
        train.find_resume(str(tmp_path / "nothing"), None)


def test_zero_cadences_are_off_and_the_kernels_line_comes_first(text, tmp_path, capsys):
    """--eval-every 0: no val loss; --checkpoint-every 0: one checkpoint, at the end; --sample-every 2: a
    sample after step 2 only (not every step); the first line names the default CPU kernels spec."""
    out = tmp_path / "r"
    log = train.main(run_args(text, out, "--eval-every", "0", "--checkpoint-every", "0", "--sample-every", "2",
                              "--sample-tokens", "2"))
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("kernels: torch   device: ") and "dtype: float32" in printed.splitlines()[0]
    assert [r["step"] for r in log] == [1, 2, 3] and not any("val_loss" in r for r in log)
    assert sorted(p.name for p in out.glob("ckpt_*")) == ["ckpt_0000003.pt"]
    assert printed.count("--- sample at step ") == 1 and "--- sample at step 2 ---" in printed
    # and with a cadence of 2: val loss and checkpoints at step 2 and at the end
    log = train.main(run_args(text, tmp_path / "c", "--eval-every", "2", "--checkpoint-every", "2", "--sample-tokens", "0",
                              "--kernels", "torch"))
    assert [r["step"] for r in log if "val_loss" in r] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "c").glob("ckpt_*")) == ["ckpt_0000002.pt", "ckpt_0000003.pt"]


# ---- gpt2.plot -----------------------------------------------------------------------------------

def write_run(folder, losses, val, hellaswag=None):
    folder.mkdir(parents=True)
    with open(folder / "log.jsonl", "w") as f:
        for step, loss in enumerate(losses, 1):
            rec = {"step": step, "loss": loss}
            if step in val:
                rec["val_loss"] = val[step]
            if hellaswag and step in hellaswag:
                rec["hellaswag"] = {"acc_norm": hellaswag[step]}
            f.write(json.dumps(rec) + "\n\n")  # a blank line is skipped
    return folder


def test_plot_draws_each_runs_train_val_and_hellaswag_series(tmp_path, monkeypatch, capsys):
    import matplotlib.pyplot as plt

    a = write_run(tmp_path / "a", [4.0, 3.0, 2.5, 2.0], {2: 3.3, 4: 2.2}, {4: 0.26})
    b = write_run(tmp_path / "b", [5.0, 4.5, 4.0, 3.5], {4: 3.9})
    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figs.append(fig))
    plot.main([str(a), str(b)])
    assert capsys.readouterr().out.strip() == str(a / "loss.png")  # default: the first run's folder
    png = a / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (b / "loss.png").exists()
    (fig,) = figs
    try:
        left, right = fig.axes
        lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in left.get_lines()}
        assert lines == {"a train": ([1, 2, 3, 4], [4.0, 3.0, 2.5, 2.0]), "a val": ([2, 4], [3.3, 2.2]),
                         "b train": ([1, 2, 3, 4], [5.0, 4.5, 4.0, 3.5]), "b val": ([4], [3.9])}
        hs = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in right.get_lines()}
        assert hs == {"a": ([4], [0.26])}
    finally:
        real_close(fig)
