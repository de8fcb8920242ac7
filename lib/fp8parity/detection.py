"""Stage B's detection limit: planted scale and offset errors of growing size at random (layer, GEMM) placements,
on every candidate; the fraction localized to the exact (layer, op, path).

A fault planted at (layer L, op) cannot change anything the forward computes before it (earlier layers at every
position, earlier ops of layer L), so those ops' local errors are the clean run's: each candidate's clean run is
replayed in full on both paths once (its false alarms, which must be none), and each trial replays layer L only.
The faulted path is the only one a trial runs; the other path is the clean run's by construction.
"""

from __future__ import annotations

import random
import time

import pandas as pd
from tqdm import tqdm

from fp8parity import replay, twin
from fp8parity.backends import make_backend
from fp8parity.config import DEFAULT_PATHS, DEFAULT_PROMPTS, RunConfig
from fp8parity.gguf_file import GGUFModel
from fp8parity.qwen2 import ForwardOptions, Qwen2Model
from fp8parity.taps import LINEAR_OPS, Recorder
from fp8parity.tokenizer import GGUFTokenizer
from fp8parity.workbench import calibrate

MAGNITUDES = (0.005, 0.01, 0.02, 0.05)
# class -> (perturbation kind, the path it is planted on): a scale error on both paths (judged on prefill), an
# offset on the decode path only
CLASSES = {"scale": ("scale", "prefill"), "offset": ("offset", "decode")}
SWEEP_CANDIDATES = ("reference", "emulated-fp8:current", "emulated-fp8:delayed-calibrated", "emulated-fp8:rowwise",
                    "emulated-fp8:block")
GEMMS = tuple(op for op, *_ in LINEAR_OPS)


def placements(n_layers: int, count: int, seed: int) -> list[tuple[int, str]]:
    rng = random.Random(seed)
    return [(rng.randrange(n_layers), rng.choice(GEMMS)) for _ in range(count)]


def sweep(model_path: str, candidates=SWEEP_CANDIDATES, magnitudes=MAGNITUDES, n_placements: int = 3,
          seed: int = 0, prompt: str = DEFAULT_PROMPTS[0]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """-> (one row per trial, one row per candidate's clean run with its false alarms)."""
    gguf = GGUFModel(model_path)
    ids = GGUFTokenizer(gguf).chat_ids(prompt)
    ref = Qwen2Model(gguf)
    trials, cleans = [], []
    for cand_name in candidates:
        name, _, recipe = cand_name.partition(":")
        backend = make_backend(name, recipe=recipe or RunConfig.recipe)
        clean = Qwen2Model(gguf, backend=backend, weights=ref.weights)
        calibrate(clean, ids)
        spec = twin.declared_spec(backend.describe(), recipe or RunConfig.recipe)
        rp = replay.Replayer(ref, twin.make_twin(spec, backend.used_input_scales()), spec.gemm_class)
        for path in DEFAULT_PATHS:  # the clean run, replayed in full: false alarms
            rec = Recorder()
            clean.run(ids, path, rec)
            table = replay.local_table(rp.replay(rec.tensors, path, ids))
            fd = replay.first_beyond(table)
            worst = table.times_floor.max()
            cleans.append({"candidate": cand_name, "path": path, "false_alarm": fd is not None,
                           "where": "" if fd is None else replay.describe_where(fd), "worst_times_floor": float(worst)})
        plan = [(cls, m, L, op) for i, cls in enumerate(CLASSES) for m in magnitudes
                for L, op in placements(gguf.config.n_layers, n_placements, seed + i)]
        for cls, m, L, op in tqdm(plan, desc=f"sweep {cand_name}"):
            kind, path = CLASSES[cls]
            signed = -m if kind == "scale" else m  # a scale error below 1 (as 0.96), an offset upwards
            faulty = Qwen2Model(gguf, backend=backend, weights=ref.weights,
                                options=ForwardOptions(perturb=((L, op, kind, signed, path),)))
            t0 = time.perf_counter()
            rec = Recorder(layers=[L - 1, L] if L else [L])
            faulty.run(ids, path, rec)
            table = replay.local_table(rp.replay(rec.tensors, path, ids, layers=[L]))
            fd = replay.first_beyond(table[table.layer == L])
            hit = fd is not None and (fd["layer"], fd["op"]) == (L, op)
            row = table[(table.layer == L) & (table.op == op)].iloc[0]
            trials.append({"candidate": cand_name, "class": cls, "magnitude": m, "layer": L, "op": op, "path": path,
                           "localized": bool(hit), "found": "" if fd is None else f"L{fd['layer']} {fd['op']}",
                           "times_floor": float(row.times_floor), "seconds": round(time.perf_counter() - t0, 1)})
    return pd.DataFrame(trials), pd.DataFrame(cleans)
