"""The loader: same seed same batches, exact resume mid-epoch, per-rank shards, length grouping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data import DataLoader, MixedDataset, PackedSFTDataset, pad_collate


class Toy(torch.utils.data.Dataset):
    """Item i: ids [i, i, ...] of length lens[i]; labels = ids."""

    def __init__(self, n=37, seed=0):
        self.lens = np.random.default_rng(seed).integers(1, 20, size=n)

    def __len__(self):
        return len(self.lens)

    def __getitem__(self, i):
        ids = torch.full((int(self.lens[i]),), i, dtype=torch.long)
        return {"input_ids": ids, "labels": ids.clone()}

    def lengths(self):
        return np.asarray(self.lens, dtype=np.int64)


def ids_of(batch):
    return sorted(set(batch["input_ids"][:, 0].tolist()))


def run(loader, epochs=1):
    out = []
    for _ in range(epochs):
        out += [ids_of(b) for b in loader]
    return out


def test_same_seed_same_batches_and_every_item_once():
    a = run(DataLoader(Toy(), batch_size=4, seed=11), epochs=2)
    b = run(DataLoader(Toy(), batch_size=4, seed=11), epochs=2)
    assert a == b
    assert sorted(i for batch in a[:10] for i in batch) == list(range(37))  # epoch 1: 10 batches
    assert a[:10] != a[10:]  # a new order each epoch
    assert run(DataLoader(Toy(), batch_size=4, seed=12)) != a[:10]
    assert run(DataLoader(Toy(), batch_size=4, shuffle=False))[0] == [0, 1, 2, 3]


@pytest.mark.parametrize("stop_after", [0, 3, 9, 10, 13])
def test_resume_mid_epoch_gives_the_remaining_batches(stop_after):
    reference = run(DataLoader(Toy(), batch_size=4, seed=5), epochs=3)
    first = DataLoader(Toy(), batch_size=4, seed=5)
    seen = []
    it = iter(first)
    for _ in range(stop_after):
        try:
            seen.append(ids_of(next(it)))
        except StopIteration:
            it = iter(first)
            seen.append(ids_of(next(it)))
    if stop_after == 10:  # finish the epoch so the state moves to the next one
        assert list(it) == []
    state = first.state_dict()
    resumed = DataLoader(Toy(), batch_size=4, seed=5)
    resumed.load_state_dict(state)
    rest = run(resumed, epochs=3 - state["epoch"])
    assert seen + rest == reference


def test_state_from_a_different_setup_is_an_error():
    state = DataLoader(Toy(), batch_size=4, seed=5).state_dict()
    with pytest.raises(ValueError, match="'batch_size'"):
        DataLoader(Toy(), batch_size=8, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="'num_samples'"):
        DataLoader(Toy(n=30), batch_size=4, seed=5).load_state_dict(state)


def test_rank_shards_are_disjoint_and_match_the_single_process_batches():
    world = [run(DataLoader(Toy(n=40), batch_size=2, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len({len(w) for w in world}) == 1
    flat = [set(i for b in w for i in b) for w in world]
    assert not (flat[0] & flat[1]) and not (flat[1] & flat[2])
    assert sum(len(f) for f in flat) == 39  # 40 // 3 * 3: the uneven tail is dropped
    single = run(DataLoader(Toy(n=40), batch_size=6, seed=3, drop_last=True))
    for k in range(len(single)):
        assert sorted(world[0][k] + world[1][k] + world[2][k]) == single[k]


def test_rank_from_torch_distributed(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = DataLoader(Toy(), batch_size=4)
        assert (loader.rank, loader.world_size) == (0, 1)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="rank 2"):
        DataLoader(Toy(), batch_size=4, rank=2, world_size=2)


def test_group_by_length_is_deterministic_and_groups():
    ds = Toy(n=400, seed=1)
    a = DataLoader(ds, batch_size=8, seed=2, group_by_length=True)
    b = DataLoader(ds, batch_size=8, seed=2, group_by_length=True)
    ga, gb = list(a), list(b)
    assert [x["input_ids"].tolist() for x in ga] == [x["input_ids"].tolist() for x in gb]
    spread = lambda batches: np.mean([int(x["attention_mask"].sum(1).max() - x["attention_mask"].sum(1).min())
                                      if "attention_mask" in x else 0 for x in batches])
    assert spread(ga) < 0.5 * spread(list(DataLoader(ds, batch_size=8, seed=2)))
    assert sorted(i for x in ga for i in x["input_ids"][:, 0].tolist()) == list(range(400))


def test_pad_collate_right_pads_and_keeps_eos_labels():
    items = [{"input_ids": torch.tensor([5, 151643]), "labels": torch.tensor([-100, 151643])},
             {"input_ids": torch.tensor([1, 2, 3, 4]), "labels": torch.tensor([1, 2, 3, 4])}]
    batch = pad_collate(items)
    assert batch["input_ids"].tolist() == [[5, 151643, 151643, 151643], [1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 151643, -100, -100], [1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert all(v.dtype == torch.long for v in batch.values())
    assert "attention_mask" not in pad_collate([items[1], items[1]])
    assert pad_collate(items, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_packed_sft_blocks_structure():
    ds = Toy(n=20)
    packed = PackedSFTDataset(ds, block_size=32, pad_id=0)
    members = [i for block in packed.blocks for i in block]
    assert members == list(range(20))
    for b in range(len(packed)):
        item = packed[b]
        n_real = int(sum(ds.lens[i] for i in packed.blocks[b]))
        assert n_real <= 32
        assert (item["labels"][n_real:] == -100).all() and (item["input_ids"][n_real:] == 0).all()
        assert item["document_ids"][n_real:].unique().tolist() in ([], [len(packed.blocks[b])])
    assert 0 < packed.fill_ratio() <= 1
    with pytest.raises(Exception, match="more than block_size"):
        PackedSFTDataset(ds, block_size=5)


def test_mixing_by_token_ratio():
    small = Toy(n=30, seed=1)  # ~300 tokens
    big = Toy(n=300, seed=2)   # ~3000 tokens
    mix = MixedDataset([small, big], ratios=[1, 1], seed=0, names=["domain", "general"])
    t_small, t_big = mix.tokens
    assert abs(t_small - t_big) <= 20  # equal token shares, within one item
    assert mix.passes[0] <= 1.0 + 1e-9  # default budget: no source repeated
    assert len(mix) == len(mix.lengths()) and mix.lengths().sum() == sum(mix.tokens)
    again = MixedDataset([small, big], ratios=[1, 1], seed=0)
    assert [again.source_of(j) for j in range(len(again))] == [mix.source_of(j) for j in range(len(mix))]
    up = MixedDataset([small, big], ratios=[1, 3], seed=0, total_tokens=int(big.lengths().sum()) * 4 // 3)
    assert up.passes[0] > 1.0  # the small source is repeated to reach its share
    assert up.tokens[1] == pytest.approx(3 * up.tokens[0], rel=0.05)
    assert "domain" in mix.summary()
    batches = list(DataLoader(mix, batch_size=4, seed=0))
    assert sum(b["input_ids"].shape[0] for b in batches) == len(mix)
