"""Logging of a training run: JSONL of every record, CSV of train scalars, TensorBoard.

`MetricsLog(workdir, resume)` is a `dmljax.train.loop.fit` callback; `LossWeightLog(objective)`
adds an ensemble's current loss weights to every logged record (before `MetricsLog`).
"""

from __future__ import annotations

import csv
import json
import os
import time

__all__ = ["LossWeightLog", "MetricsLog"]


class MetricsLog:
    """JSONL of every record + CSV of train scalars + TensorBoard (only if tensorboardX exists)."""

    def __init__(self, workdir: str, resume: bool):
        os.makedirs(workdir, exist_ok=True)
        mode = "a" if resume else "w"
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), mode)
        self.csv_path = os.path.join(workdir, "metrics.csv")
        self.csv = open(self.csv_path, mode, newline="")
        self.writer = None
        self.tb = None
        try:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:
            pass

    def __call__(self, state, record):
        if len(record) <= 1:
            return
        record = dict(record, time=time.time())
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if not k.startswith("eval/")}
        if "loss" in scalars:
            if self.writer is None:
                self.writer = csv.DictWriter(self.csv, fieldnames=sorted(scalars), extrasaction="ignore")
                if self.csv.tell() == 0:
                    self.writer.writeheader()
            self.writer.writerow(scalars)
            self.csv.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "time"):
                    self.tb.add_scalar(k, v, record["step"])
        if any(k.startswith("eval/") for k in record):
            evals = {k[5:]: round(v, 4) for k, v in record.items() if k.startswith("eval/")}
            print(f"\n[step {record['step']}] eval: {evals}", flush=True)

    def close(self):
        self.jsonl.close()
        self.csv.close()
        if self.tb is not None:
            self.tb.close()




class LossWeightLog:
    """Callback adding the ensemble's current loss weights to every logged record."""

    def __init__(self, objective):
        self.objective = objective

    def __call__(self, state, record):
        if "loss" in record:
            record.update(self.objective.loss_weights(state))


