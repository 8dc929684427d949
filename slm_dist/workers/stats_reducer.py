"""Collects every stage's Gram statistics and accumulates HSIC sums for all pairs of layers.

A batch counts once it has a Gram for every row (the embedding output and each layer's output)
from whatever stages produced them; its HSIC matrix is added to a float64 accumulator keyed by
batch id, so a batch re-sent after a stage crash is never counted twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from slm_dist.core import similarity
from slm_dist.workers.stage_worker import StageStats


class StatsReducer:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.num_rows = num_layers + 1
        self.hsic = similarity.HsicAccumulator(self.num_rows)
        self._pending: dict[int, dict[int, Tensor]] = {}      # batch -> row -> gram
        self._pending_bi: dict[int, dict[int, tuple[float, float, int]]] = {}
        self.cos_sums = torch.zeros(num_layers, dtype=torch.float64)
        self.angular_sums = torch.zeros(num_layers, dtype=torch.float64)
        self.counts = torch.zeros(num_layers, dtype=torch.float64)
        self.fingerprint: str | None = None  # set by load(): what the checkpointed sums came from

    def add(self, stats: StageStats) -> bool:
        """Take one stage's statistics; returns True when this completed a new batch."""
        bid = stats.batch_id
        if bid in self.hsic.batch_ids:
            return False  # a retried batch: already counted
        rows = self._pending.setdefault(bid, {})
        for row, g in zip(stats.rows, stats.grams):
            rows[row] = g  # a re-sent stage overwrites its own rows with identical values
        bi = self._pending_bi.setdefault(bid, {})
        for layer, count in stats.counts.items():
            bi[layer] = (stats.cos_sums[layer], stats.angular_sums[layer], count)
        if len(rows) < self.num_rows:
            return False
        grams = torch.stack([rows[r] for r in range(self.num_rows)]).double()
        self.hsic.add(bid, similarity.hsic_matrix(grams))
        for layer, (cos_sum, ang_sum, count) in bi.items():
            self.cos_sums[layer] += cos_sum
            self.angular_sums[layer] += ang_sum
            self.counts[layer] += count
        del self._pending[bid], self._pending_bi[bid]
        return True

    @property
    def num_batches(self) -> int:
        return self.hsic.num_batches

    def cka(self) -> Tensor:  # [L+1, L+1]
        return self.hsic.cka()

    def block_influence(self) -> Tensor:  # [L]: 1 - mean cos(input, output) per layer
        return 1.0 - self.cos_sums / self.counts.clamp(min=1)

    def angular_distance(self) -> Tensor:  # [L]
        return self.angular_sums / self.counts.clamp(min=1)

    # ---------------------------------------------------------------------------- checkpointing
    def save(self, path: Path, fingerprint: str | None = None) -> None:
        """Write the completed sums to ``stats.parquet`` (temporary name, then rename).

        ``fingerprint`` names the inputs the sums came from (model, statistics, batches), so a resumed
        run can tell its own checkpoint from a stale one.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        state = self.hsic.state_dict()
        table = pa.table({
            "row": list(range(self.num_rows)),
            "hsic_sums": [r.tolist() for r in state["sums"]],
            "cos_sum": self.cos_sums.tolist() + [0.0],
            "angular_sum": self.angular_sums.tolist() + [0.0],
            "count": self.counts.tolist() + [0.0],
        })
        meta = {"batch_ids": list(state["batch_ids"]), "num_layers": self.num_layers, "fingerprint": fingerprint}
        table = table.replace_schema_metadata({"slm_dist": json.dumps(meta)})
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "StatsReducer":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"slm_dist"])
        reducer = cls(int(meta["num_layers"]))
        sums = torch.tensor(table.column("hsic_sums").to_pylist(), dtype=torch.float64)
        reducer.hsic = similarity.HsicAccumulator.from_state_dict({"batch_ids": meta["batch_ids"], "sums": sums})
        n = reducer.num_layers
        reducer.cos_sums = torch.tensor(table.column("cos_sum").to_pylist()[:n], dtype=torch.float64)
        reducer.angular_sums = torch.tensor(table.column("angular_sum").to_pylist()[:n], dtype=torch.float64)
        reducer.counts = torch.tensor(table.column("count").to_pylist()[:n], dtype=torch.float64)
        reducer.fingerprint = meta.get("fingerprint")
        return reducer
