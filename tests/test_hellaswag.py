"""HellaSwag: our batched, padded scoring against a plain one-example-at-a-time implementation that
runs the transformers model directly, on the first real examples of the offline validation set."""
import json
import os

import pytest
import torch

from conftest import requires_cuda
from gpt2 import hellaswag
from gpt2.model import GPT, GPTConfig
from numerics import assert_close

N = 50  # examples from the real file


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def data_path():
    path = os.path.join(os.environ.get("GPT2_DATA_CACHE", ""), "hellaswag", "hellaswag_val.jsonl")
    if not os.path.isfile(path):
        pytest.skip(f"offline HellaSwag copy not found at {path}")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random GPT-2 with the real 50257-token vocab, float64 so that near-ties cannot flip."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # a wide init spreads the endings' scores far apart compared with rounding
    cfg = transformers.GPT2Config(n_positions=128, n_embd=16, n_layer=2, n_head=2, initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel(cfg).double().eval()
    path = tmp_path_factory.mktemp("hf_hellaswag")
    hf.save_pretrained(path)
    return str(path), hf


@pytest.fixture(scope="module")
def ours(hf_dir):
    return GPT.from_pretrained(hf_dir[0]).double().eval()


def plain_scores(hf, path, n):
    """The straightforward version: one example, one ending, one forward pass at a time."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    sums, correct = [], [0, 0, 0]
    with open(path) as f:
        lines = [json.loads(next(f)) for _ in range(n)]
    for ex in lines:
        ctx = enc.encode(ex["ctx"])
        scores = []
        for ending in ex["endings"]:
            end = enc.encode(" " + ending)
            with torch.no_grad():  # the lm_head only where the ending's tokens are predicted: cheap
                hidden = hf.transformer(torch.tensor([ctx + end])).last_hidden_state[0]
                logits = hf.lm_head(hidden[len(ctx) - 1: len(ctx) - 1 + len(end)])
            logp = torch.log_softmax(logits.double(), dim=-1)
            total = sum(logp[i, tok].item() for i, tok in enumerate(end))
            scores.append((total, total / len(end), total / len(ending)))
        sums.append(scores)
        for m in range(3):
            best = max(range(4), key=lambda j: (scores[j][m], -j))  # first of equal maxima
            correct[m] += best == ex["label"]
    return torch.tensor(sums, dtype=torch.float64), correct  # (N, 4, 3): sum, per token, per char


@pytest.fixture(scope="module")
def plain(hf_dir, data_path):
    return plain_scores(hf_dir[1], data_path, N)


def test_matches_plain_implementation(ours, plain, data_path, monkeypatch):
    sums_ref, correct = plain
    seen = []  # spy on the per-ending scores behind evaluate's counts (one pass, not two)
    scores = hellaswag.ending_scores
    monkeypatch.setattr(hellaswag, "ending_scores", lambda *a, **k: seen.append(scores(*a, **k)) or seen[-1])
    result = hellaswag.evaluate(ours, data_path, limit=N, batch_size=8)
    assert result == dict(n=N, acc=correct[0] / N, acc_norm=correct[1] / N, acc_norm_char=correct[2] / N)
    sums, n_tok, n_char = seen[0]
    assert sums.shape == (N, 4)
    ours_all = torch.stack([sums, sums / n_tok, sums / n_char], dim=-1)
    assert torch.allclose(ours_all, sums_ref, rtol=1e-10, atol=1e-10), (ours_all - sums_ref).abs().amax(dim=(0, 1))
    # the three metrics are different rankings: a mix-up of normalizations shows up
    preds = hellaswag.predictions(sums, n_tok, n_char)
    assert not torch.equal(preds[0], preds[1]) and not torch.equal(preds[1], preds[2])


def test_batch_size_and_rank_split_do_not_change_numbers(ours, data_path):
    n = 13
    one = hellaswag.evaluate(ours, data_path, limit=n, batch_size=1)
    many = hellaswag.evaluate(ours, data_path, limit=n, batch_size=5)  # the last batch is partial
    assert one == many and one["n"] == n
    # two "ranks" without torch.distributed: each scores its share; the counts add up to the whole
    halves = [hellaswag.evaluate(ours, data_path, limit=n, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    assert [h["n"] for h in halves] == [7, 6]
    for key in ("acc", "acc_norm", "acc_norm_char"):
        assert round(sum(h[key] * h["n"] for h in halves)) == round(one[key] * n)


def test_fixed_padded_shape(ours, data_path):
    examples = hellaswag.tokenized_examples(data_path, N)
    T = hellaswag.pad_length(examples, ours.config.block_size)
    assert T % hellaswag.PAD_MULTIPLE == 0 and T >= max(len(c) + len(e) for c, ends, *_ in examples for e in ends)
    shapes = []
    handle = ours.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        hellaswag.ending_scores(ours, examples[:5], batch_size=2)
    finally:
        handle.remove()
    assert shapes == [(8, hellaswag.pad_length(examples[:5], 128))] * 3  # the last batch padded to 2 examples


def test_one_graph_under_torch_compile(ours, data_path):
    """Every batch, the partial last one included, has one shape: a compiled model compiles once."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(ours, backend=counting_backend, dynamic=False)
    try:
        result = hellaswag.evaluate(compiled, data_path, limit=7, batch_size=3)
    finally:
        torch._dynamo.reset()
    assert result["n"] == 7 and len(graphs) == 1


def test_long_context_loses_leftmost_tokens():
    ex = [(list(range(100, 200)), [[1, 2, 3]] * 4, [3, 5, 7, 9], 0)]
    tokens, targets, n_tok, n_char = hellaswag.build_batch(ex, T=16, rows=4)
    assert tokens[0].tolist() == list(range(187, 200)) + [1, 2, 3]
    assert targets[0].tolist() == [-1] * 12 + [1, 2, 3, -1]
    assert n_tok.tolist() == [3] * 4 and n_char.tolist() == [3, 5, 7, 9]
    with pytest.raises(ValueError, match="an example: ending 0 .16 tokens. does not fit"):
        hellaswag.build_batch([([5], [[1] * 16] * 4, [1] * 4, 0)], T=16, rows=4)
    with pytest.raises(ValueError, match="hs.jsonl:7: ending 0 .16 tokens. does not fit"):
        hellaswag.build_batch([([5], [[1] * 16] * 4, [1] * 4, 0, "hs.jsonl:7")], T=16, rows=4)


GOOD = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "bad JSON"),
    (json.dumps(dict(GOOD, endings=["a", "b", "c"])), "'endings' must be a list of 4 non-empty strings"),
    (json.dumps(dict(GOOD, label=4)), "'label' must be 0, 1, 2 or 3, got 4"),
    (json.dumps(dict(GOOD, label=None)), "'label' must be"),
    (json.dumps(dict(GOOD, ctx=3)), "'ctx' must be a non-empty string"),
    (json.dumps(dict(GOOD, ctx="")), "'ctx' must be a non-empty string"),
    ("[1, 2]", "expected a JSON object"),
])
def test_malformed_line_names_line_number(tmp_path, bad, message):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + bad + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(ValueError, match=f"hs.jsonl:3: {message}"):
        hellaswag.read_examples(str(path))
    assert len(hellaswag.read_examples(str(path), limit=1)) == 1  # a limit stops before the bad line


def test_cli_json(hf_dir, data_path, capsys):
    result = hellaswag.main(["--model", hf_dir[0], "--data", data_path, "--limit", "6", "--batch-size", "4", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result and set(printed) == {"n", "acc", "acc_norm", "acc_norm_char"} and printed["n"] == 6
    text = hellaswag.main(["--model", hf_dir[0], "--data", data_path, "--limit", "10", "--batch-size", "4"])
    assert len({text["acc"], text["acc_norm"], text["acc_norm_char"]}) == 3  # a mixed-up label shows
    assert capsys.readouterr().out == (f"HellaSwag (10 examples): acc {text['acc']:.4f}  acc_norm {text['acc_norm']:.4f}  "
                                       f"acc_norm_char {text['acc_norm_char']:.4f}\n")
    with pytest.raises(FileNotFoundError, match="no such HellaSwag file"):
        hellaswag.evaluate(None, data_path=str(data_path) + ".missing")


@requires_cuda
def test_cuda_triton_bf16_scores(data_path):
    """On a GPU, bf16 autocast: the ending scores with our kernels are within 2x the error of the
    torch backend's, both against a float64 run; a compiled model gives the same numbers."""
    from kernels import BackendUnavailable

    cfg = GPTConfig.preset("small")
    torch.manual_seed(0)
    try:
        model = GPT(cfg, kernels="triton").cuda()
    except BackendUnavailable as e:
        pytest.skip(str(e))
    plain = GPT(cfg, kernels="torch").cuda()
    plain.load_state_dict(model.state_dict())
    examples = hellaswag.tokenized_examples(data_path, 200)
    ref64 = hellaswag.ending_scores(plain.double(), examples, 10)[0]  # float64 logits: small batches
    plain.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        baseline = hellaswag.ending_scores(plain, examples, 50)[0]
        ours = hellaswag.ending_scores(model, examples, 50)[0]
        result = hellaswag.evaluate(model, data_path, limit=200, batch_size=50)
        compiled = hellaswag.evaluate(torch.compile(model), data_path, limit=200, batch_size=50)
    assert_close(ours, ref64, baseline, atol=1e-2, name="ending log-likelihoods")
    assert result["n"] == 200 and abs(result["acc"] - compiled["acc"]) <= 0.02


def test_ending_too_long_names_its_line(tmp_path):
    """evaluate's "does not fit" error names the file and line of the example."""
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(dict(GOOD, endings=["a", "b " * 40, "c", "d"])) + "\n")
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match=r"hs.jsonl:3: ending 1 \(\d+ tokens\) does not fit the padded length 32"):
        hellaswag.evaluate(model, str(path), batch_size=2)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_no_examples_is_an_error(tmp_path, content):
    path = tmp_path / "hs.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="hs.jsonl: no examples"):
        hellaswag.evaluate(None, str(path))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="limit must be None .all examples. or an integer >= 1"):
            hellaswag.evaluate(None, str(path), limit=bad)


@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-3"), ("--batch-size", "0")])
def test_cli_rejects_limits_below_one(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--model", str(tmp_path / "none"), "--data", str(tmp_path / "none.jsonl"), flag, value])
    assert e.value.code == 2 and f"{flag}: must be >= 1, got {value}" in capsys.readouterr().err


def test_download_is_checked(tmp_path, monkeypatch, data_path):
    target = tmp_path / "cache" / "hellaswag_val.jsonl"

    def fake(body):
        def retrieve(url, filename):
            with open(filename, "wb") as f:
                f.write(body)
        return retrieve

    good = open(data_path, "rb").read()
    for body in (good[:-1000], good.replace(b"ctx", b"CTX", 1), b""):  # truncated, altered, empty
        monkeypatch.setattr(hellaswag.urllib.request, "urlretrieve", fake(body))
        with pytest.raises(hellaswag.DownloadError, match="expected sha256 0aa3b888.* and 10,042 lines; deleted it"):
            hellaswag.download(str(target))
        assert list(target.parent.iterdir()) == []  # neither the file nor a partial one is left
    monkeypatch.setattr(hellaswag.urllib.request, "urlretrieve", fake(good))
    hellaswag.download(str(target))
    assert target.read_bytes() == good and list(target.parent.iterdir()) == [target]


def test_torchrun_splits_examples_across_ranks(hf_dir, data_path, tmp_path):
    """torchrun -m gpt2.hellaswag, 2 gloo ranks: one JSON line (rank 0), the numbers of one process."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cli = ["--model", hf_dir[0], "--data", data_path, "--limit", "5", "--batch-size", "2", "--device", "cpu", "--json"]
    one = hellaswag.main(cli)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2.hellaswag", *cli]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout  # rank 0 only
    got = json.loads(lines[0])
    assert got["n"] == 5 and got == pytest.approx(one, abs=1e-12)


def test_ties_go_to_the_first_ending():
    """Each metric's argmax over the 4 endings picks the first of equal maxima (as the plain version does)."""
    sums = torch.tensor([[-2.0, -1.0, -1.0, -3.0], [-4.0, -4.0, -4.0, -4.0]], dtype=torch.float64)
    n_tok = torch.tensor([[2.0, 1.0, 1.0, 1.0], [4.0, 2.0, 2.0, 1.0]], dtype=torch.float64)
    n_char = torch.tensor([[2.0, 1.0, 1.0, 3.0], [1.0, 4.0, 4.0, 1.0]], dtype=torch.float64)
    acc, acc_norm, acc_norm_char = hellaswag.predictions(sums, n_tok, n_char)
    assert acc.tolist() == [1, 0] and acc_norm.tolist() == [0, 0] and acc_norm_char.tolist() == [0, 1]


def test_string_labels_and_empty_context(tmp_path):
    """The HF datasets copy stores labels as strings ("2"): read as ints. An empty context is a named error."""
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps(dict(GOOD, label="2")) + "\n" + json.dumps(dict(GOOD, label="3")) + "\n")
    assert [ex["label"] for ex in hellaswag.read_examples(str(path))] == [2, 3]
    with pytest.raises(ValueError, match="hs.jsonl:4: empty context"):
        hellaswag.build_batch([([], [[1, 2]] * 4, [1] * 4, 0, "hs.jsonl:4")], T=16, rows=4)


def test_default_data_path_and_download_on_first_use(tmp_path, monkeypatch):
    """Without --data: $GPT2_DATA_CACHE/hellaswag/ when the file is there, else the user cache, downloaded
    (by rank 0) when missing, then scored; a batch_size below 1 is a named error."""
    shared = tmp_path / "shared"
    (shared / "hellaswag").mkdir(parents=True)
    monkeypatch.setenv("GPT2_DATA_CACHE", str(shared))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cached = tmp_path / "xdg" / "gpt2-kernel-lab" / "hellaswag" / "hellaswag_val.jsonl"
    assert hellaswag.default_data_path() == str(cached)  # the shared folder lacks the file
    (shared / "hellaswag" / "hellaswag_val.jsonl").write_text(json.dumps(GOOD) + "\n")
    assert hellaswag.default_data_path() == str(shared / "hellaswag" / "hellaswag_val.jsonl")
    monkeypatch.delenv("GPT2_DATA_CACHE")
    downloads = []

    def fake_download(path):
        downloads.append(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write((json.dumps(GOOD) + "\n") * 3)

    monkeypatch.setattr(hellaswag, "download", fake_download)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=1, n_embd=8))
    assert hellaswag.evaluate(model, batch_size=2)["n"] == 3 and downloads == [str(cached)]
    cached.unlink()  # another rank never downloads (without a process group there is no barrier to wait at)
    with pytest.raises(FileNotFoundError):
        hellaswag.evaluate(model, batch_size=2, rank=1, world_size=2)
    assert len(downloads) == 1
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        hellaswag.evaluate(model, batch_size=0)
