"""gpt2/data.py: shard format and its checks, the loader's order, DDP split and resumable state."""
import os

import numpy as np
import pytest
import torch

from gpt2 import data as D


def shard(tmp_path, tokens, name="d_train_000000.bin"):
    path = tmp_path / name
    D.write_shard(path, np.asarray(tokens))
    return path


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def rows(batch_list):
    """The set of x rows (as tuples) in a list of batches."""
    return {tuple(r.tolist()) for x, _ in batch_list for r in x}


# ---- shard files -------------------------------------------------------------------------------

def test_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, size=1001)
    path = shard(tmp_path, tokens)
    assert os.path.getsize(path) == D.HEADER_BYTES + 2 * 1001
    assert D.read_header(path) == 1001
    np.testing.assert_array_equal(D.read_shard(path), tokens)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_write_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="uint16"):
        D.write_shard(tmp_path / "x.bin", np.array([1, 70000]))
    with pytest.raises(ValueError, match="uint16"):
        D.write_shard(tmp_path / "x.bin", np.array([-1, 5]))
    D.write_shard(tmp_path / "edge.bin", np.array([0, 0xFFFF]))  # both ends of the range fit
    np.testing.assert_array_equal(D.read_shard(tmp_path / "edge.bin"), [0, 0xFFFF])


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"NOTSHARD" + b[8:], "bad magic"),
    (lambda b: b[:8] + (2).to_bytes(4, "little") + b[12:], "version 2"),
    (lambda b: b[:-3], "truncated"),
    (lambda b: b + b"\0\0", "trailing bytes"),
    (lambda b: b[:10], "shorter than"),
    (lambda b: b"", "shorter than"),
])
def test_bad_files_name_the_file(tmp_path, damage, message):
    path = shard(tmp_path, np.arange(100))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(D.ShardError, match=message) as e:
        D.read_header(path)
    assert str(path) in str(e.value)
    with pytest.raises(D.ShardError):  # the loader refuses it at construction, before training
        D.make_loader(str(tmp_path), "train", 2, 4)


def test_out_of_range_token_names_file_and_position(tmp_path):
    tokens = np.arange(400) % 1000
    tokens[123] = 50257  # == vocab size: invalid for GPT-2
    path = shard(tmp_path, tokens)
    loader = D.make_loader(str(tmp_path), "train", 2, 8, vocab_size=50257)
    with pytest.raises(D.ShardError, match="token id 50257 at position 123") as e:
        loader.next_batch()
    assert str(path) in str(e.value)
    D.make_loader(str(tmp_path), "train", 2, 8, vocab_size=50258).next_batch()  # fine for a bigger vocab


def test_vocab_scan_covers_every_chunk_end(tmp_path, monkeypatch):
    """The vocab check scans a shard in chunks (16M tokens each): with 4-token chunks, a bad id at a chunk's
    last position, or at the shard's very last position, is found too."""
    real = D._chunked_max
    monkeypatch.setattr(D, "_chunked_max", lambda a: real(a, chunk=4))
    for where in (3, 7, 0, 40):
        tokens = np.arange(41) % 100
        tokens[where] = 60000
        source = D.Source.from_file(shard(tmp_path, tokens, f"d_train_{where:06d}.bin"))
        with pytest.raises(D.ShardError, match=f"token id 60000 at position {where} "):
            source.tokens(50257)
    assert real(np.zeros(0, np.uint16)) == -1


def test_dataset_smaller_than_one_batch(tmp_path):
    path = shard(tmp_path, np.arange(4 * 8))  # 3 full sequences of 8+1 tokens, batch needs 4
    with pytest.raises(D.ShardError, match="fewer than one batch") as e:
        D.make_loader(str(tmp_path), "train", 4, 8)
    assert str(path) in str(e.value)
    D.make_loader(str(tmp_path), "train", 3, 8)  # exactly one batch fits
    with pytest.raises(D.ShardError, match="2 rank"):
        D.make_loader(str(tmp_path), "train", 3, 8, rank=0, world_size=2)
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=f"rank {rank} is not in"):
            D.make_loader(str(tmp_path), "train", 1, 8, rank=rank, world_size=world)


def test_missing_split(tmp_path):
    shard(tmp_path, np.arange(100))
    with pytest.raises(D.ShardError, match=r"no \*_val_\*.bin"):
        D.make_loader(str(tmp_path), "val", 2, 4)


# ---- loader order --------------------------------------------------------------------------------

@pytest.fixture
def two_shards(tmp_path):
    """Two train shards with distinct token values, so every sequence is identifiable."""
    shard(tmp_path, np.arange(0, 8 * 25 + 1), "d_train_000000.bin")  # 25 sequences of 8
    shard(tmp_path, np.arange(1000, 1000 + 8 * 14 + 5), "d_train_000001.bin")  # 14 sequences
    return str(tmp_path)


def test_batches_are_shifted_windows_and_an_epoch_covers_every_sequence_once(two_shards):
    loader = D.make_loader(two_shards, "train", 3, 8, seed=1)
    assert loader.steps_per_epoch == 39 // 3
    epoch = batches(loader, loader.steps_per_epoch)
    for x, y in epoch:
        assert x.dtype == torch.int64 and x.shape == (3, 8)
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
        assert torch.equal(x, x[:, :1] + torch.arange(8))  # a contiguous window of the shard
    starts = sorted(int(r[0]) for x, _ in epoch for r in x)
    expected = sorted([8 * i for i in range(25)] + [1000 + 8 * i for i in range(14)])
    assert set(starts) <= set(expected) and len(set(starts)) == len(starts) == 39
    assert loader.epoch == 0
    nxt = batches(loader, loader.steps_per_epoch)  # the second epoch: a new order of the same sequences
    assert loader.epoch == 1
    assert rows(nxt) == rows(epoch) and [x.tolist() for x, _ in nxt] != [x.tolist() for x, _ in epoch]


def test_shuffle_is_seeded_and_val_is_in_order(two_shards, tmp_path):
    a = batches(D.make_loader(two_shards, "train", 2, 8, seed=5), 6)
    b = batches(D.make_loader(two_shards, "train", 2, 8, seed=5), 6)
    c = batches(D.make_loader(two_shards, "train", 2, 8, seed=6), 6)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))
    os.rename(tmp_path / "d_train_000000.bin", tmp_path / "d_val_000000.bin")
    val = D.make_loader(two_shards, "val", 2, 8)
    assert [int(x[0, 0]) for x, _ in batches(val, 3)] == [0, 16, 32]


def test_shard_and_sequence_orders_are_drawn_per_epoch_and_per_shard(tmp_path):
    """Three shards of 10 sequences each: an epoch reads one shard after the other, each in its own order.
    The shard order is drawn per epoch (not once for the run), and the sequence order per (epoch, shard):
    shards of the same size do not share one order, and a shard's order changes from epoch to epoch."""
    for k in range(3):
        shard(tmp_path, 1000 * k + np.arange(4 * 10 + 1), f"d_train_{k:06d}.bin")
    loader = D.make_loader(str(tmp_path), "train", 2, 4, seed=0)
    epochs = []
    for _ in range(6):
        starts = [int(r[0]) for x, _ in batches(loader, loader.steps_per_epoch) for r in x]
        visits = [(v // 1000, v % 1000 // 4) for v in starts]  # (shard, sequence index in it)
        shards = [k for k, _ in visits[::10]]
        assert [k for k, _ in visits] == [k for k in shards for _ in range(10)] and sorted(shards) == [0, 1, 2]
        epochs.append((shards, {k: [i for kk, i in visits if kk == k] for k in range(3)}))
    assert len({tuple(shards) for shards, _ in epochs}) > 1, "the same shard order every epoch"
    for _, orders in epochs:
        assert all(sorted(order) == list(range(10)) for order in orders.values())
        assert len({tuple(order) for order in orders.values()}) == 3, "shards of one size share one order"
    for k in range(3):
        assert len({tuple(orders[k]) for _, orders in epochs}) == 6, f"shard {k} repeats an order across epochs"


def test_ddp_ranks_are_disjoint_and_match_one_process(two_shards):
    world = 3
    single = batches(D.make_loader(two_shards, "train", 2, 8, seed=3), 18)
    ranks = [batches(D.make_loader(two_shards, "train", 2, 8, rank=r, world_size=world, seed=3), 6) for r in range(world)]
    for r in range(world):
        for s in range(r + 1, world):
            assert not rows(ranks[r]) & rows(ranks[s])
    # rank r's i-th batch is the single process's batch i * world + r: W ranks == W-fold accumulation
    for r in range(world):
        for i in range(6):
            assert torch.equal(ranks[r][i][0], single[i * world + r][0])


def test_state_resume_is_exact_across_epochs_and_world_sizes(two_shards):
    ref = D.make_loader(two_shards, "train", 2, 8, seed=7)
    expected = batches(ref, 45)  # 19 batches per epoch: crosses two epoch ends
    first = D.make_loader(two_shards, "train", 2, 8, seed=7)
    batches(first, 17)
    state = first.state_dict()
    resumed = D.make_loader(two_shards, "train", 2, 8, seed=7)
    resumed.load_state_dict(state)
    got = batches(resumed, 28)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected[17:]))
    # a checkpoint from 1 process continued by 2 ranks: together they read the same next batches
    pair = [D.make_loader(two_shards, "train", 2, 8, rank=r, world_size=2, seed=7) for r in range(2)]
    for loader in pair:
        loader.load_state_dict(state)
    r0, r1 = batches(pair[0], 1)[0], batches(pair[1], 1)[0]
    assert torch.equal(r0[0], expected[17][0]) and torch.equal(r1[0], expected[18][0])


def test_any_epoch_is_computed_from_seed_epoch_and_batch_alone(two_shards):
    """A loader put by its state at (epoch e, batch j) reads what one that went through every batch before
    reads: nothing (order, cached permutation) is carried from one epoch into the next, and the epoch of a
    state is restored, not just its position in the epoch."""
    ref = D.make_loader(two_shards, "train", 2, 8, seed=7)
    n = ref.steps_per_epoch
    run = batches(ref, 5 * n)
    for e in range(5):
        for j in (0, 6):
            jump = D.make_loader(two_shards, "train", 2, 8, seed=7)
            jump.load_state_dict({**jump.state_dict(), "epoch": e, "consumed": j})
            got = batches(jump, n - j)
            assert all(torch.equal(a[0], b[0]) for a, b in zip(got, run[e * n + j:(e + 1) * n])), (e, j)


def test_state_from_another_dataset_is_refused(two_shards, tmp_path_factory):
    state = D.make_loader(two_shards, "train", 2, 8).state_dict()
    with pytest.raises(ValueError, match="seq_len"):
        D.make_loader(two_shards, "train", 2, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        D.make_loader(two_shards, "train", 2, 8, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        D.make_loader(two_shards, "train", 3, 8).load_state_dict(state)
    sources = D.resolve_sources(two_shards, "train")
    with pytest.raises(ValueError, match="shuffle"):
        D.DataLoader(sources, 2, 8, shuffle=False).load_state_dict(state)
    with pytest.raises(ValueError, match="sources"):  # one shard of the two
        D.DataLoader(sources[:1], 2, 8).load_state_dict(state)
    renamed = tmp_path_factory.mktemp("renamed")
    for i, src in enumerate(sources):
        (renamed / f"e_train_{i:06d}.bin").write_bytes(open(src.path, "rb").read())
    with pytest.raises(ValueError, match="sources"):  # the same tokens under other names: another dataset
        D.make_loader(str(renamed), "train", 2, 8).load_state_dict(state)


def test_state_survives_moving_the_data_folder(two_shards, tmp_path_factory):
    """A state records shard names and sizes, not the folder: a run resumes after its data moved."""
    first = D.make_loader(two_shards, "train", 2, 8, seed=3)
    batches(first, 5)
    state = first.state_dict()
    expected = batches(first, 3)
    moved = tmp_path_factory.mktemp("moved")
    for path in D.shard_paths(two_shards, "train"):
        (moved / path.name).write_bytes(path.read_bytes())
    resumed = D.make_loader(str(moved), "train", 2, 8, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(resumed, 3), expected))


# ---- preparing data ----------------------------------------------------------------------------

def test_text_prep_and_txt_on_the_fly(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("First doc.\n\nSecond doc,\nstill second.\n\n\nThird.\n")
    b.write_text("Another file.")
    one_per_file = D.prepare_text([a, b], tmp_path / "files", val_fraction=0.25)
    tokens = np.concatenate([D.read_shard(p) for p in one_per_file])
    assert (tokens == D.EOT).sum() == 2 and tokens[0] == D.EOT
    assert [p.name for p in one_per_file] == ["text_train_000000.bin", "text_val_000000.bin"]
    assert len(D.read_shard(one_per_file[1])) == round(0.25 * len(tokens))
    paras = D.prepare_text([a, b], tmp_path / "paras", blank_lines=True, shard_tokens=7)
    tokens = np.concatenate([D.read_shard(p) for p in paras])
    assert (tokens == D.EOT).sum() == 4  # 3 paragraphs + 1 file
    assert max(len(D.read_shard(p)) for p in paras) == 7 and len(paras) > 3
    enc = D.encoding()
    assert enc.decode(tokens[1:].tolist()).startswith("First doc.<|endoftext|>Second doc,\nstill second.<|endoftext|>Third.")
    # a .txt given to the loader directly: same tokens, the last 10% as val
    txt = D.resolve_sources(str(a), "train")[0].tokens(50257)
    val = D.resolve_sources(str(a), "val")[0].tokens(50257)
    np.testing.assert_array_equal(np.concatenate([txt, val]), D.tokenize_documents([a.read_text()]))


def test_document_shards_first_is_val(tmp_path):
    texts = [f"document number {i} " * 5 for i in range(40)]
    paths = D.prepare_documents(iter(texts), tmp_path, "edu", shard_tokens=100, max_shards=3, workers=1)
    assert [p.name for p in paths] == ["edu_val_000000.bin", "edu_train_000001.bin", "edu_train_000002.bin"]
    tokens = np.concatenate([D.read_shard(p) for p in paths])
    assert len(tokens) == 300 and tokens[0] == D.EOT
    np.testing.assert_array_equal(tokens, D.tokenize_documents(texts)[:300])


def test_failed_downloads_say_where_to_put_a_local_copy(tmp_path, monkeypatch):
    """Offline, the first use of tiktoken's BPE files or of tiny Shakespeare used to end in a stack of
    requests/urllib tracebacks; now one DownloadError (an OSError) names the fix, and nothing is saved."""
    import urllib.error
    import urllib.request

    import tiktoken

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(D.DownloadError, match="TIKTOKEN_CACHE_DIR") as e:
        D.encoding()
    assert "Failed to resolve" in str(e.value) and isinstance(e.value, OSError)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("GPT2_DATA_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(D.DownloadError, match=r"could not download tiny Shakespeare .*Name or service not known.*GPT2_DATA_CACHE"):
        D.shakespeare_path()
    assert not list((tmp_path / "xdg").rglob("*.txt"))


def test_shakespeare_from_cache_folder(tmp_path, monkeypatch):
    src = os.path.join(os.environ.get("GPT2_DATA_CACHE", ""), "corpus", "tinyshakespeare.txt")
    if not os.path.isfile(src):
        pytest.skip("offline tiny Shakespeare not present (set GPT2_DATA_CACHE)")
    for layout in ("flat", "corpus"):
        cache = tmp_path / layout
        target = cache / "tinyshakespeare.txt" if layout == "flat" else cache / "corpus" / "tinyshakespeare.txt"
        target.parent.mkdir(parents=True)
        target.write_text("ROMEO: hi\n")
        monkeypatch.setenv("GPT2_DATA_CACHE", str(cache))
        assert D.shakespeare_path() == str(target)
    monkeypatch.setenv("GPT2_DATA_CACHE", os.path.dirname(os.path.dirname(src)))
    paths = D.prepare_text([D.shakespeare_path()], tmp_path / "shk", "shakespeare")
    n = [D.read_header(p) for p in paths]
    assert sum(n) == 338025 + 1 and n[1] == round(0.1 * sum(n))  # + the leading <|endoftext|>


@pytest.mark.parametrize("argv, message", [
    (["text", "A", "--out", "O", "--shard-tokens", "0"], "--shard-tokens: must be >= 1"),
    (["text", "A", "--out", "O", "--shard-tokens", "-5"], "--shard-tokens: must be >= 1"),
    (["shakespeare", "--out", "O", "--shard-tokens", "0"], "--shard-tokens: must be >= 1"),
    (["text", "A", "--out", "O", "--val-fraction", "1.5"], "--val-fraction: must be > 0 and < 1"),
    (["text", "A", "--out", "O", "--val-fraction", "0"], "--val-fraction: must be > 0 and < 1"),
    (["text", "A", "--out", "O", "--val-fraction", "-0.1"], "--val-fraction: must be > 0 and < 1"),
    (["fineweb", "--out", "O", "--shards", "0"], "--shards: must be >= 1"),
    (["fineweb", "--out", "O", "--shards", "-2"], "--shards: must be >= 1"),
    (["fineweb", "--out", "O", "--workers", "0"], "--workers: must be >= 1"),
])
def test_cli_rejects_bad_sizes(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "a.txt") if a == "A" else str(tmp_path / "out") if a == "O" else a for a in argv]
    (tmp_path / "a.txt").write_text("some text " * 20)
    with pytest.raises(SystemExit) as e:
        D.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_missing_file_is_one_error_line(tmp_path, capsys):
    # a file the user named that does not exist: the message, exit status 1, no traceback, no shards
    with pytest.raises(SystemExit) as e:
        D.main(["text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: ") and "missing.txt" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_prep_functions_reject_bad_sizes(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("some text " * 20)
    for bad in (0, -3):  # 0 used to loop forever, negative gave numpy's "negative dimensions"
        with pytest.raises(ValueError, match="shard_tokens must be an integer >= 1"):
            D.prepare_text([a], tmp_path / "out", shard_tokens=bad)
        with pytest.raises(ValueError, match="shard_tokens must be an integer >= 1"):
            D.ShardWriter(tmp_path / "out", "x", shard_tokens=bad)
        with pytest.raises(ValueError, match="max_shards must be None"):
            D.ShardWriter(tmp_path / "out", "x", shard_tokens=8, max_shards=bad)
        with pytest.raises(ValueError, match="shards must be None"):
            D.prepare_fineweb(tmp_path / "out", shards=bad)
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match="val_fraction must be > 0 and < 1"):
            D.prepare_text([a], tmp_path / "out", val_fraction=bad)
    b = tmp_path / "b.txt"
    b.write_text("hi")  # 2 tokens: 10% of them rounds to no val token at all
    with pytest.raises(ValueError, match="both splits need at least one token"):
        D.prepare_text([b], tmp_path / "out")


def test_split_is_the_word_before_the_index(tmp_path):
    """The split glob `*_train_*.bin` also matched `hamlet_train_val_000000.bin`: the train split of a
    dataset named `hamlet_train` read its val shard too."""
    shard(tmp_path, np.arange(100), "hamlet_train_train_000000.bin")
    shard(tmp_path, np.arange(100), "hamlet_train_val_000000.bin")
    shard(tmp_path, np.arange(100), "notes_val_train_000001.bin")
    shard(tmp_path, np.arange(100), "x_train_1.bin")  # not an index of 6 digits: not a shard name
    assert [p.name for p in D.shard_paths(tmp_path, "train")] == ["hamlet_train_train_000000.bin", "notes_val_train_000001.bin"]
    assert [p.name for p in D.shard_paths(tmp_path, "val")] == ["hamlet_train_val_000000.bin"]


def test_preparing_into_a_folder_with_shards_of_that_name_is_refused(tmp_path):
    """A second preparation into the same folder used to keep the first one's higher-numbered shards,
    mixing two corpora; now it is refused before anything is written."""
    a = tmp_path / "a.txt"
    a.write_text("hello world, this is some text. " * 400)
    out = tmp_path / "shards"
    first = D.prepare_text([a], out, shard_tokens=500)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    a.write_text("completely different corpus now. " * 100)
    with pytest.raises(D.ShardError, match=r"already holds \d+ shard\(s\) named 'text' \(text_train_000000.bin") as e:
        D.prepare_text([a], out, shard_tokens=5000)
    assert str(out) in str(e.value)
    with pytest.raises(D.ShardError, match="already holds"):
        D.prepare_documents(iter(["doc"]), out, "text", shard_tokens=100, workers=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and len(first) == len(before)
    assert [p.name for p in D.prepare_text([a], out, name="other", shard_tokens=5000)] == [
        "other_train_000000.bin", "other_val_000000.bin"]  # another name in the same folder is fine
    with pytest.raises(SystemExit) as e:  # the CLI: one error line
        D.main(["text", str(a), "--out", str(out), "--shard-tokens", "5000"])
    assert e.value.code == 1


def test_concurrent_shakespeare_downloads_both_succeed(tmp_path, monkeypatch):
    """Every DDP rank calls shakespeare_path(): two downloads finishing together wrote one shared
    `.tmp` name, so one rank's rename found no file (FileNotFoundError)."""
    import threading
    import urllib.request

    body = b"ROMEO: hi\n" * 100
    monkeypatch.setattr(D, "SHAKESPEARE_SHA256", __import__("hashlib").sha256(body).hexdigest())
    monkeypatch.setenv("GPT2_DATA_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return body

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Response())
    both_written = threading.Barrier(2, timeout=20)
    real_replace = os.replace

    def replace_together(src, dst):  # both ranks have written their temp file before either renames it
        both_written.wait()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_together)
    results = []

    def rank():
        try:
            results.append(D.shakespeare_path())
        except Exception as e:  # noqa: BLE001 (reported below)
            results.append(e)

    threads = [threading.Thread(target=rank) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = tmp_path / "xdg" / "gpt2-kernel-lab" / "tinyshakespeare.txt"
    assert results == [str(target)] * 2, results
    assert target.read_bytes() == body and [p.name for p in target.parent.iterdir()] == ["tinyshakespeare.txt"]
