"""KTO under torchrun (2 CPU processes, gloo) against one process, on run_dist.py's tiny Qwen.

What equality means for KTO: TRL 1.16 forms the KL (mismatched) rows inside each process's
micro-batch (a rotation by one of its completions) and averages the KL baseline z over the
processes (gather_for_metrics(kl).mean()). So 2 processes x b rows are NOT 1 process x 2b rows
with the default collate: that one rotates over all 2b rows, other (prompt, completion) pairs,
another z (checked below, so the comparison can fail). They are 1 process x 2b rows whose KL rows
are formed as the two processes form theirs: data.kto_collate(kl_stride=2) rotates each of the
micro-batch's interleaved halves (train.MicroBatchSampler gives rank r the positions r, r + 2,
...) on its own. Then every micro-batch holds the same rows and KL rows, z is the mean over the
same 2b KL rows (the mean of two equal-size means), the loss is normalised by the rows of both
ranks and DDP sums the gradients: the TRL-named metrics, loss curve and adapter agree to float
rounding (fp32, LoRA dropout 0, Adam eps 1e-4 as in test_distributed.py).

The bound: the one-process run padded to a multiple of 64 tokens (equal in exact arithmetic,
other matmul shapes) measures the rounding floor of this run; the two-process run must stay within
FLOOR_FACTOR x that floor, and the default-collate run must not.
"""

from __future__ import annotations

import json


from tests.helpers import max_rel_err
from tests.train.test_distributed import SCRIPT, adapter, run_dist, torchrun

RUN = {"objective": "kto", "max_steps": 4, "grad_accum": 2, "eps": 1e-4, "lr": 2e-2, "beta": 0.5}
METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def metrics(out) -> list:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def worst(got, want) -> float:
    """The largest relative difference of the metrics of every step and the adapter's tensors."""
    rows_a, rows_b = metrics(got), metrics(want)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert all(r["examples"] == 8 for r in rows_a + rows_b)
    diff = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for a, b in zip(rows_a, rows_b) for k in METRICS)
    a1, a2 = adapter(got), adapter(want)
    assert a1.keys() == a2.keys() and len(a1) > 0
    return max(diff, *(max_rel_err(a1[k], a2[k]) for k in a1))


def test_kto_on_two_processes_is_one_process_with_the_kl_rows_of_two(tmp_path):
    one = tmp_path / "one"
    run_dist.build({"out_dir": str(one), **RUN, "batch_size": 4, "kl_stride": 2}).fit()
    steps = metrics(one)
    assert min(r["kl"] for r in steps[2:]) > 0, "z is exercised (not clamped to 0; the adapter is fresh until step 3)"
    assert abs(steps[-1]["rewards/margins"]) > 1e-3, "the adapter moved"
    floor_run = tmp_path / "padded"
    run_dist.build({"out_dir": str(floor_run), **RUN, "batch_size": 4, "kl_stride": 2, "pad_to": 64}).fit()
    other_pairs = tmp_path / "rotated-over-all"
    run_dist.build({"out_dir": str(other_pairs), **RUN, "batch_size": 4}).fit()
    two = tmp_path / "two"
    torchrun(SCRIPT, json.dumps({"out_dir": str(two), **RUN, "batch_size": 2}))

    floor, got, wrong = worst(floor_run, one), worst(two, one), worst(other_pairs, one)
    print(f"floor {floor:.3g}, two processes {got:.3g}, default collate {wrong:.3g}")
    assert got <= FLOOR_FACTOR * max(floor, 1e-7), (got, floor)
    assert wrong > 100 * FLOOR_FACTOR * max(floor, 1e-7), (wrong, floor)


FLOOR_FACTOR = 10
