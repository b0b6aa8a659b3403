"""Training speed benchmark: time to a validation target, positions/s, arithmetic/s against this
machine's matmul rate, and where the time goes.

    python bench/train_speed.py                                  # Beauty, configs/beauty.yaml
    python bench/train_speed.py --max-time-s 400 --set trainer.batch_size=256
    python bench/train_speed.py --skip throughput train --optimizer-ab 20     # fused vs unfused AdamW
    python bench/train_speed.py --skip throughput train --ab HEAD~1           # this checkout vs a revision
    python bench/train_speed.py --skip throughput --peer recbole --peer-python /work/recbole-venv/bin/python

The measurements, in this order, all with torch on the same threads as training:

1. **Matmul rate**: the best of several fp32 ``(n, n) @ (n, n)`` products (n = 2048), and the same
   for the shape that dominates training (positions x dim @ dim x items, the full softmax).
2. **Throughput**: ``--steps`` real training steps (``TwoTowerSystem.training_step``, backward,
   AdamW) on Beauty batches: positions (predicted next items) per second, and the arithmetic of
   those exact steps counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, attention;
   forward and backward), as a share of the matmul rate.
3. **Profile**: ``torch.profiler`` over ``--profile-steps`` steps, the top operators by self time.
4. **Time to target**: ``towerline train`` of the config (``trainer.max_time_s`` = ``--max-time-s``)
   and the first epoch whose unmasked validation NDCG@10 (``valid_unmasked/ndcg_10``, RecBole's
   protocol) reaches ``--target`` (0.0492, RecBole SASRec's at 921 s), with the run's test metrics.
5. **Code A/B** (``--ab REV``): this checkout against git revision ``REV`` (``git archive`` into a
   temp dir), each in a worker process of its own fed the same batches, single training steps and
   whole validation passes interleaved ABBA: medians of CPU seconds (what a shared machine's load
   changes least) and wall seconds, and the epoch they add up to.
6. **Peer** (``--peer recbole --peer-python /work/recbole-venv/bin/python``): RecBole 1.2.1 SASRec
   (CE, hidden 64, 2 layers, max len 50, batch 256) on the same S3Rec file, converted to RecBole
   atomic files in a temp dir (``bench/recbole_peer.py``, run by the peer's interpreter: a venv of
   its own, ``pip install torch==2.13.0`` first so no CUDA build comes in, then ``recbole==1.2.1``),
   its unmasked validation NDCG@10 per epoch and when it reaches ``--target``.

On a GPU the same script runs with mixed precision
(``trainer.precision=bf16-mixed`` unless ``--set trainer.precision=...``).
Writes bench/results/train_speed.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.0492  # RecBole 1.2.1 SASRec (CE) unmasked validation NDCG@10 at 921 s on this machine (issue 15)


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    """Best fp32 FLOP/s of an (n, n) @ (n, n) product on the current device and threads."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    return _best_rate(lambda: a @ b, 2.0 * n**3, reps)


def shape_rate(m: int, k: int, n: int, reps: int = 5) -> float:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
    return _best_rate(lambda: a @ b, 2.0 * m * k * n, reps)


def _best_rate(fn, flops: float, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(cfg, work: Path):
    """The DataModule and system exactly as ``towerline train`` builds them."""
    from towerline.training.data import SequenceDataModule
    from towerline.training.ranker_model import item_categories
    from towerline.training.system import TwoTowerSystem

    dm = SequenceDataModule(cfg, work / "data")
    dm.prepare_data()
    dm.setup()
    s = dm.stats
    system = TwoTowerSystem(s.n_items, s.n_attributes, s.n_event_types, cfg, item_attributes=dm.item_attributes,
                            item_counts=dm.item_counts, item_category=item_categories(dm.item_attributes, dm.vocabs.attributes))
    return dm, system


def throughput(cfg, work: Path, steps: int, profile_steps: int) -> dict:
    """Positions/s and counted FLOP/s of real training steps, plus a profile of a few of them."""
    from torch.utils.flop_counter import FlopCounterMode

    from towerline.features.vocab import PAD_IDX

    dm, system = build(cfg, work)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    system = system.to(dev).train()
    opt = system.configure_optimizers()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else torch.autocast("cpu", enabled=False)
    loader = iter(dm.train_dataloader())
    batches = [tuple(t.to(dev) for t in next(loader)) for _ in range(steps + 3 + profile_steps)]

    def step(batch, i):
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = system.training_step(batch, i)
        loss.backward()
        opt.step()

    system.log = lambda *a, **k: None  # no Trainer attached: Lightning's self.log would refuse
    for i, b in enumerate(batches[:3]):  # warm-up (allocator, kernels)
        step(b, i)
    timed = batches[3 : 3 + steps]
    # one 2048^3 matmul timed beside every step: the step's share of the machine's rate is then
    # taken under the same load, not against a rate measured minutes earlier
    n = 2048
    a, b2 = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    step_s, step_cpu_s, rates = [], [], []
    for i, b in enumerate(timed):
        rates.append(_best_rate(lambda: a @ b2, 2.0 * n**3, 1))
        _sync()
        c0, t0 = time.process_time(), time.perf_counter()
        step(b, i)
        _sync()
        step_s.append(time.perf_counter() - t0)
        step_cpu_s.append(time.process_time() - c0)
    seconds = sum(step_s)
    positions = int(sum(int((b[2] != PAD_IDX).sum()) for b in timed))
    counter = FlopCounterMode(display=False)
    with counter:
        for i, b in enumerate(timed[: min(10, steps)]):
            step(b, i)
    flops_per_step = counter.get_total_flops() / min(10, steps)
    import statistics

    median_step_s, median_rate = statistics.median(step_s), statistics.median(rates)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for i, b in enumerate(batches[3 + steps :]):
            step(b, i)
    avgs = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in avgs) or 1.0
    top = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    table = avgs.table(sort_by="self_cpu_time_total", row_limit=15)
    return {
        "steps": steps,
        "batch_size": cfg.trainer.batch_size,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "positions": positions,
        "positions_per_s": positions / seconds,
        "flops_per_step": flops_per_step,
        "flops_per_s": flops_per_step * steps / seconds,
        "median_step_s": median_step_s,
        "median_step_cpu_s": statistics.median(step_cpu_s),
        "interleaved_matmul_flops_per_s": median_rate,
        "share_of_interleaved_matmul": flops_per_step / median_step_s / median_rate,
        "flops_by_op": by_op,
        "profile_top": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / profile_steps,
                         "share": e.self_cpu_time_total / total, "calls": e.count} for e in top],
        "profile_table": table,
        "windows_per_epoch": len(dm.training_dataset()),
        "n_items": dm.stats.n_items,
    }


def optimizer_ab(cfg, work: Path, rounds: int) -> dict:
    """Median training-step seconds with the fused AdamW ``configure_optimizers`` gives against the
    unfused (for-loop) one, steps interleaved on the same batches so a shared machine's load hits both."""
    import copy
    import statistics

    dm, system = build(cfg, work)
    system.log = lambda *a, **k: None
    arms = {"fused": system, "unfused": copy.deepcopy(system)}
    opts = {"fused": system.configure_optimizers(),
            "unfused": torch.optim.AdamW(arms["unfused"].parameters(), lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)}
    loader = iter(dm.train_dataloader())
    batches = [next(loader) for _ in range(rounds + 2)]
    times: dict[str, list[float]] = {k: [] for k in arms}
    for i, b in enumerate(batches):
        for name in (("fused", "unfused") if i % 2 else ("unfused", "fused")):
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            arms[name].training_step(b, i).backward()
            opts[name].step()
            if i >= 2:  # the first two rounds warm up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"rounds": rounds, "median_step_s": med, "speedup": med["unfused"] / med["fused"]}


PACKAGE_DIRS = {"towerline": "core", "towerline.features": "features", "towerline.training": "training",
                "towerline.marketing": "marketing", "towerline.serving": "serving"}  # pyproject's package-dir


def import_towerline_from(root: Path) -> None:
    """Import the ``towerline`` packages from the checkout at ``root`` (pyproject's package-dir
    layout), whatever the environment has installed: how a worker times another revision's code."""
    import importlib.util

    for name, folder in PACKAGE_DIRS.items():
        d = root / folder
        spec = importlib.util.spec_from_file_location(name, d / "__init__.py", submodule_search_locations=[str(d)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        if "." in name:
            setattr(sys.modules["towerline"], name.split(".", 1)[1], module)


def step_worker(cfg, work: Path, steps: int) -> None:
    """Serve timing requests on stdin/stdout: ``train N`` runs the next N training steps (the same
    batches in every worker: the loader is seeded), ``eval`` one full validation pass (both the
    masked and the unmasked ranking of every validation user, as each epoch does); each answers a
    JSON line with CPU seconds of this process and wall seconds. CPU seconds are what a shared
    machine's load changes least."""
    from towerline.features.vocab import PAD_IDX

    dm, system = build(cfg, work)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    system = system.to(dev)
    system.log = lambda *a, **k: None
    opt = system.configure_optimizers()
    loader = iter(dm.train_dataloader())
    batches = [tuple(t.to(dev) for t in next(loader)) for _ in range(steps)]
    state = {"i": 0}

    def train(n: int) -> int:
        system.train()
        positions = 0
        for _ in range(n):
            b = batches[state["i"] % len(batches)]
            state["i"] += 1
            opt.zero_grad(set_to_none=True)
            system.training_step(b, state["i"]).backward()
            opt.step()
            positions += int((b[2] != PAD_IDX).sum())
        return positions

    def evaluate() -> int:
        system.eval()
        system.on_validation_epoch_start()
        with torch.no_grad():
            for i, b in enumerate(dm.val_dataloader()):
                system.validation_step({k: v.to(dev) for k, v in b.items()}, i)
        users = sum(a.n_users for a in system._acc.values()) // max(len(system._acc), 1)
        system._acc, system._eval_items = {}, None
        return users

    train(2)  # warm-up: allocator, kernels, the pooling matrix
    print(json.dumps({"ready": True, "steps_per_epoch": dm.n_train_batches()}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        _sync()
        c0, t0 = time.process_time(), time.perf_counter()
        count = train(int(cmd[1])) if cmd[0] == "train" else evaluate()
        _sync()
        print(json.dumps({"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0, "count": count}), flush=True)


def code_ab(rev: str, argv_cfg: list[str], rounds: int, steps: int, evals: int) -> dict:
    """This checkout against git revision ``rev``, in two worker processes (``step_worker``) fed the
    same batches, requests interleaved (ABBA) so a shared machine's load hits both alike: medians of
    CPU and wall seconds per training step and per validation pass."""
    import statistics
    import subprocess

    base = Path(tempfile.mkdtemp(prefix="towerline-ab-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    arms = {f"{rev} ({sha})": base, "this checkout": REPO}
    procs = {}
    for name, root in arms.items():
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(root), "--steps", str(steps), *argv_cfg]
        procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=base)
    info = {name: json.loads(p.stdout.readline()) for name, p in procs.items()}

    def ask(name: str, request: str) -> dict:
        procs[name].stdin.write(request + "\n")
        procs[name].stdin.flush()
        return json.loads(procs[name].stdout.readline())

    names = list(arms)
    per_step: dict[str, dict[str, list[float]]] = {n: {"cpu_s": [], "wall_s": [], "positions": []} for n in names}
    per_eval: dict[str, dict[str, list[float]]] = {n: {"cpu_s": [], "wall_s": []} for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            a = ask(name, "train 1")
            for k in ("cpu_s", "wall_s"):
                per_step[name][k].append(a[k])
            per_step[name]["positions"].append(a["count"])
    for r in range(evals):
        for name in (names if r % 2 == 0 else names[::-1]):
            a = ask(name, "eval")
            for k in ("cpu_s", "wall_s"):
                per_eval[name][k].append(a[k])
    for p in procs.values():
        p.stdin.close()
        p.wait()
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    out: dict = {"rev": rev, "rounds": rounds, "evals": evals, "arms": {}}
    for name in names:
        arm = {"step_cpu_s": med(per_step[name]["cpu_s"]), "step_wall_s": med(per_step[name]["wall_s"]),
               "positions_per_step": statistics.mean(per_step[name]["positions"]),
               "eval_cpu_s": med(per_eval[name]["cpu_s"]), "eval_wall_s": med(per_eval[name]["wall_s"]),
               "steps_per_epoch": info[name]["steps_per_epoch"]}
        arm["epoch_cpu_s"] = arm["step_cpu_s"] * arm["steps_per_epoch"] + (arm["eval_cpu_s"] or 0.0)
        out["arms"][name] = arm
    old, new = (out["arms"][n] for n in names)
    out["step_cpu_speedup"] = old["step_cpu_s"] / new["step_cpu_s"]
    out["step_wall_speedup"] = old["step_wall_s"] / new["step_wall_s"]
    if evals:
        out["eval_cpu_speedup"] = old["eval_cpu_s"] / new["eval_cpu_s"]
    out["epoch_cpu_speedup"] = old["epoch_cpu_s"] / new["epoch_cpu_s"]
    return out


def time_to_target(cfg, work: Path, target: float) -> dict:
    from towerline.training.train import train

    t0 = time.perf_counter()
    result = train(cfg, work / "run", progress=False)
    wall = time.perf_counter() - t0
    curve = result.curve
    hit = next((p for p in curve if p.get("valid_unmasked/ndcg_10", 0.0) >= target), None)
    return {
        "target": target,
        "reached_at_s": None if hit is None else round(hit["elapsed_s"], 1),
        "reached_at_epoch": None if hit is None else int(hit["epoch"]) + 1,
        "fit_seconds": round(curve[-1]["elapsed_s"], 1) if curve else None,
        "wall_s": round(wall, 1),
        "epochs": len(curve),
        "seconds_per_epoch": round(curve[-1]["elapsed_s"] / len(curve), 1) if curve else None,
        "best_valid_unmasked_ndcg_10": max((p.get("valid_unmasked/ndcg_10", 0.0) for p in curve), default=None),
        "curve": [(round(p["elapsed_s"], 1), p.get("valid/ndcg_10"), p.get("valid_unmasked/ndcg_10")) for p in curve],
        "metrics": {k: v for k, v in result.metrics.items() if k.startswith(("test/", "test_unmasked/", "best/"))},
    }


def run_peer(args, cfg) -> dict:
    """The peer's run (``bench/recbole_peer.py`` under ``--peer-python``) on the config's data file,
    on the same threads; its JSON line, or why there is none."""
    import subprocess

    python = str(args.peer_python or sys.executable)
    if cfg.data.format != "s3rec" or not cfg.data.path:
        return {"error": f"--peer needs an S3Rec data file; the config has format {cfg.data.format!r}"}
    budget = args.peer_max_time_s or args.max_time_s
    cmd = [python, str(REPO / "bench" / "recbole_peer.py"), "--data", str(Path(cfg.data.path).resolve()),
           "--max-time-s", str(budget), "--target", str(args.target)] + (["--keep-going"] if args.peer_keep_going else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget + 900)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{python}: {e}"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"{python} bench/recbole_peer.py exited {done.returncode}: {done.stderr.strip()[-400:]}"}
    return {**json.loads(lines[-1]), "python": python}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "beauty.yaml")
    parser.add_argument("--max-time-s", type=float, default=420.0, help="fit budget of the time-to-target run")
    parser.add_argument("--target", type=float, default=TARGET)
    parser.add_argument("--steps", type=int, default=40, help="timed training steps for throughput")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "train"])
    parser.add_argument("--optimizer-ab", type=int, default=0, metavar="ROUNDS",
                        help="also time fused vs unfused AdamW steps, interleaved, this many rounds")
    parser.add_argument("--ab", metavar="REV", default=None,
                        help="also time training steps and validation passes of this checkout against git revision "
                             "REV, interleaved in two processes on the same batches")
    parser.add_argument("--ab-rounds", type=int, default=30, help="--ab: timed steps per arm")
    parser.add_argument("--ab-evals", type=int, default=2, help="--ab: timed validation passes per arm")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # --ab's timing process
    parser.add_argument("--peer", choices=["recbole"], default=None,
                        help="also train a peer on the same data file: RecBole 1.2.1 SASRec (bench/recbole_peer.py)")
    parser.add_argument("--peer-python", type=Path, default=None,
                        help="the peer's interpreter, a venv of its own (default: this one)")
    parser.add_argument("--peer-max-time-s", type=float, default=None, help="the peer's budget (default: --max-time-s)")
    parser.add_argument("--peer-keep-going", action="store_true", help="train the peer on after the target")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "train_speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.worker is not None:
        import_towerline_from(args.worker.resolve())
        from towerline.config import load_config

        work = Path(tempfile.mkdtemp(prefix="towerline-ab-worker-"))
        step_worker(load_config(args.config.resolve(), args.overrides), work, args.steps)
        return 0

    from towerline.config import load_config

    args.out, config = args.out.resolve(), args.config.resolve()
    work = Path(tempfile.mkdtemp(prefix="towerline-train-speed-"))
    os.chdir(work)  # MLflow's ./mlruns artifacts stay out of the checkout
    overrides = [f"trainer.max_time_s={args.max_time_s}", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}"]
    if torch.cuda.is_available() and not any(o.startswith("trainer.precision=") for o in args.overrides):
        overrides.append("trainer.precision=bf16-mixed")
    cfg = load_config(config, overrides + args.overrides)
    report: dict = {
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} torch threads",
        "load_average_start": os.getloadavg(),
    }
    peak = matmul_rate()
    report["matmul_flops_per_s"] = peak
    report["softmax_shape_flops_per_s"] = shape_rate(1200, cfg.model.dim, 12103)
    print(f"matmul fp32 2048^3: {peak / 1e9:.1f} GFLOP/s; softmax shape (1200x{cfg.model.dim} @ {cfg.model.dim}x12103): "
          f"{report['softmax_shape_flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    if "throughput" not in args.skip:
        tp = throughput(cfg, work, args.steps, args.profile_steps)
        tp["share_of_matmul"] = tp["flops_per_s"] / peak
        report["throughput"] = tp
        print(f"throughput: {tp['positions_per_s']:.0f} positions/s, {tp['steps_per_s']:.2f} steps/s, "
              f"{tp['flops_per_step'] / 1e9:.2f} GFLOP/step -> {tp['flops_per_s'] / 1e9:.1f} GFLOP/s = "
              f"{100 * tp['share_of_matmul']:.0f}% of the matmul rate; median step {tp['median_step_s']:.3f} s "
              f"({tp['median_step_cpu_s']:.3f} CPU-s) against 2048^3 matmuls timed between the steps "
              f"({tp['interleaved_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s): "
              f"{100 * tp['share_of_interleaved_matmul']:.0f}%", flush=True)
        print(tp["profile_table"], flush=True)
    if args.optimizer_ab:
        ab = optimizer_ab(cfg, work, args.optimizer_ab)
        report["optimizer_ab"] = ab
        print(f"AdamW step: fused {ab['median_step_s']['fused']:.3f} s vs unfused {ab['median_step_s']['unfused']:.3f} s "
              f"(median of {ab['rounds']}): {ab['speedup']:.3f}x", flush=True)
    if args.ab:
        ab = code_ab(args.ab, ["--config", str(config)] + [a for o in args.overrides for a in ("--set", o)],
                     args.ab_rounds, args.steps, args.ab_evals)
        report["code_ab"] = ab
        for name, arm in ab["arms"].items():
            print(f"{name}: step {arm['step_cpu_s']:.3f} CPU-s ({arm['step_wall_s']:.3f} s wall), validation pass "
                  f"{arm['eval_cpu_s'] or 0:.2f} CPU-s, epoch ~{arm['epoch_cpu_s']:.1f} CPU-s", flush=True)
        print(f"speed-up: step {ab['step_cpu_speedup']:.2f}x CPU ({ab['step_wall_speedup']:.2f}x wall), "
              f"epoch {ab['epoch_cpu_speedup']:.2f}x CPU (medians of {ab['rounds']} interleaved steps)", flush=True)
    if "train" not in args.skip:
        tt = time_to_target(cfg, work, args.target)
        report["time_to_target"] = tt
        print(f"time to valid_unmasked/ndcg_10 >= {args.target}: {tt['reached_at_s']} s (epoch {tt['reached_at_epoch']}); "
              f"{tt['epochs']} epochs in {tt['fit_seconds']} s; best unmasked {tt['best_valid_unmasked_ndcg_10']:.4f}; "
              f"test NDCG@10 {tt['metrics'].get('test/ndcg_10')}", flush=True)
    if args.peer:
        report["peer"] = run_peer(args, cfg)
        peer = report["peer"]
        print(f"peer: {peer.get('peer', peer)}: target {args.target} reached {peer.get('reached')}; "
              f"{peer.get('epochs')} epochs, {peer.get('seconds_per_epoch')} s each; best {peer.get('best_valid_ndcg_10')}",
              flush=True)
        tt = report.get("time_to_target")
        if tt and tt.get("reached_at_s") and (peer.get("reached") or {}).get("s"):
            report["time_to_target_ratio_vs_peer"] = peer["reached"]["s"] / tt["reached_at_s"]
            print(f"time to target: peer / towerline = {report['time_to_target_ratio_vs_peer']:.1f}x", flush=True)
    report["load_average_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
